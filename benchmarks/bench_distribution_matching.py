"""Benchmark 2: does FlowRL keep more distinct correct reasoning paths than GRPO, at the same accuracy?

    python benchmarks/bench_distribution_matching.py                 # 3 seeds x 300 steps per trainer
    python benchmarks/bench_distribution_matching.py --seeds 0,1 --steps 100
    python benchmarks/bench_distribution_matching.py --smoke         # a few seconds' check that it runs

FlowRL and GRPO train the embedded tiny model on the built-in arithmetic task with the recipes' embedded settings
(`recipes/configs/embedded/{flowrl,grpo}_arithmetic.yaml`: lr 1e-4, 8 problems x 8 completions per step, 300 steps,
temperature 1.0, the math-verify reward), with the same seeds. Every `--eval-every` steps a callback samples
`--eval-samples` completions at temperature 1.0 for each of `--eval-problems` fixed held-out problems and measures
(see `arithmetic_runs.py`):

- accuracy (avg@k, the mean correctness of the samples) and pass@k;
- distinct correct paths per problem: how many different valid reasoning paths (exact path ids of the task) the
  correct samples of a problem take, averaged over all problems (0 for an unsolved problem);
- entropy (nats) of the frequencies of the correct paths of a problem, averaged over the problems with a correct
  sample.

Target (issue 6): FlowRL's distinct correct paths at the end at least 2x GRPO's (ratio of the means over seeds), with
its accuracy within 5 points (FlowRL's mean accuracy at least GRPO's minus 5 points; higher is fine). Prints the
per-seed and mean figures and whether the target is met, and writes `distribution_matching.json` and
`distribution_matching.png` to `--output-dir`. Nothing is tuned to meet the target.
"""

import argparse
import sys
import time

import arithmetic_runs as ar


TRAINERS = ("grpo", "flowrl")
METRICS = (
    ("accuracy", "accuracy (avg@k)", 100.0),
    ("pass_at_k", "pass@k", 100.0),
    ("distinct_correct_paths", "distinct correct paths / problem", 1.0),
    ("distinct_correct_paths_solved", "... / solved problem", 1.0),
    ("correct_path_entropy", "entropy over correct paths (nats)", 1.0),
    ("valid_path_rate", "samples writing a valid path", 100.0),
    ("distinct_answers", "distinct final answers / problem", 1.0),
)
PATHS_TARGET = 2.0
ACCURACY_TOLERANCE = 0.05


def final_summary(records: list[dict]) -> dict:
    """Each metric of the last evaluation point, over seeds."""
    return {
        key: ar.summarize([r["curve"][-1][key] for r in records])
        for key, _, _ in METRICS
        if all(r["curve"][-1][key] is not None for r in records)
    }


def evaluate_target(final: dict) -> dict:
    grpo, flowrl = final["grpo"], final["flowrl"]
    grpo_paths, flowrl_paths = grpo["distinct_correct_paths"]["mean"], flowrl["distinct_correct_paths"]["mean"]
    paths_ratio = flowrl_paths / grpo_paths if grpo_paths > 0 else None  # None: GRPO solved nothing
    gap = flowrl["accuracy"]["mean"] - grpo["accuracy"]["mean"]
    per_seed_ratio = [
        f / g if g > 0 else None
        for f, g in zip(flowrl["distinct_correct_paths"]["per_seed"], grpo["distinct_correct_paths"]["per_seed"])
    ]
    paths_met = flowrl_paths > 0 if paths_ratio is None else paths_ratio >= PATHS_TARGET
    accuracy_met = gap >= -ACCURACY_TOLERANCE
    return {
        "description": "FlowRL distinct correct paths >= 2x GRPO's, FlowRL accuracy >= GRPO's - 5 points",
        "paths_ratio": paths_ratio,
        "paths_ratio_per_seed": per_seed_ratio,
        "paths_target": PATHS_TARGET,
        "paths_met": paths_met,
        "paths_shortfall": None if paths_met or paths_ratio is None else PATHS_TARGET - paths_ratio,
        "accuracy_gap_points": 100 * gap,
        "accuracy_gap_per_seed_points": [
            100 * (f - g) for f, g in zip(flowrl["accuracy"]["per_seed"], grpo["accuracy"]["per_seed"])
        ],
        "accuracy_tolerance_points": 100 * ACCURACY_TOLERANCE,
        "accuracy_met": accuracy_met,
        "met": paths_met and accuracy_met,
    }


def print_report(initial: dict, final: dict, target: dict, seeds: list[int]) -> None:
    width = 36
    print(f"\nHeld-out figures at the end of training (seeds {seeds}; per-seed values in brackets):")
    print(f"{'':{width}s} {'initial':>8s} {'GRPO':>24s} {'FlowRL':>24s}")
    for key, label, scale in METRICS:
        if key not in final["grpo"] or key not in final["flowrl"]:
            continue
        cells = []
        for name in TRAINERS:
            s = final[name][key]
            per_seed = ", ".join(f"{scale * v:.2f}" for v in s["per_seed"])
            cells.append(f"{scale * s['mean']:6.2f} [{per_seed}]")
        start = initial.get(key)
        start_text = f"{scale * start:8.2f}" if start is not None else f"{'-':>8s}"
        print(f"{label:{width}s} {start_text} {cells[0]:>24s} {cells[1]:>24s}")
    print(
        f"\nTarget: FlowRL >= {PATHS_TARGET:.0f}x GRPO's distinct correct paths, accuracy within "
        f"{100 * ACCURACY_TOLERANCE:.0f} points."
    )
    ratio_text = ", ".join("-" if r is None else f"{r:.2f}" for r in target["paths_ratio_per_seed"])
    ratio = "undefined (GRPO has none)" if target["paths_ratio"] is None else f"{target['paths_ratio']:.2f}x"
    shortfall = target["paths_shortfall"]
    print(
        f"  paths ratio FlowRL/GRPO: {ratio} (per seed {ratio_text}): "
        + ("met" if target["paths_met"] else "MISSED" + ("" if shortfall is None else f" by {shortfall:.2f}x"))
    )
    gaps = ", ".join(f"{g:+.1f}" for g in target["accuracy_gap_per_seed_points"])
    print(
        f"  accuracy FlowRL - GRPO: {target['accuracy_gap_points']:+.1f} points (per seed {gaps}): "
        + ("met" if target["accuracy_met"] else "MISSED")
    )
    print(f"  target {'met' if target['met'] else 'missed'}")


def plot(runs: dict, path) -> None:
    plt = ar.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ar.plot_metric(axes[0], runs, lambda p: 100 * p["accuracy"], ylabel="held-out accuracy (avg@k, %)")
    ar.plot_metric(axes[1], runs, "distinct_correct_paths", ylabel="distinct correct paths per problem")
    ar.plot_metric(
        axes[2], runs, lambda p: p["correct_path_entropy"] or 0.0, ylabel="entropy over correct paths (nats)"
    )
    for ax in axes:
        ax.set_xlabel("training step")
    axes[0].legend()
    fig.suptitle("FlowRL vs GRPO on the embedded arithmetic task (held-out, temperature 1.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ar.add_run_arguments(parser)
    args = parser.parse_args(argv)
    seeds, spec, output_dir = ar.resolve_run_arguments(args)
    ar.quiet()
    start = time.perf_counter()

    runs = {name: [] for name in TRAINERS}
    for seed in seeds:  # interleaved, so that a slow spell of the machine does not fall on one trainer
        for name in TRAINERS:
            runs[name].append(
                ar.tracked_run(name, seed, args.steps, spec, cache_dir=args.cache_dir, use_cache=not args.no_cache)
            )

    initial = runs["grpo"][0]["curve"][0]
    final = {name: final_summary(records) for name, records in runs.items()}
    target = evaluate_target(final)
    print_report(initial, final, target, seeds)

    report = ar.report_header("distribution_matching", args.smoke, ar.run_settings(args, seeds, spec))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "initial": {key: initial[key] for key, _, _ in METRICS},
            "final": final,
            "target": target,
            "runs": {name: [ar.run_summary(r) for r in records] for name, records in runs.items()},
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    ar.write_json(output_dir / "distribution_matching.json", report)
    plot(runs, output_dir / "distribution_matching.png")
    print(f"\nwrote {output_dir / 'distribution_matching.json'} and distribution_matching.png")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
