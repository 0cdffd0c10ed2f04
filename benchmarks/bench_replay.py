"""Benchmark 7: does replaying past rollouts let FlowRL's matching objective learn from fewer generations?

    python benchmarks/bench_replay.py                    # 2 arms x 3 seeds x 300 steps
    python benchmarks/bench_replay.py --arms flowrl_matching_replay --seeds 0   # one arm (another process: the other)
    python benchmarks/bench_replay.py --smoke            # a check that it runs (2 steps)

Two arms train the embedded model on the built-in arithmetic task with the recipes' embedded settings, the same seeds,
steps and held-out evaluation as benchmark 2, at the learning rate the matching objective chose there (1e-4,
`--learning-rate`; not chosen again for the replay arm):

- `flowrl_matching`: FlowRL's matching objective at its preset, every group generated;
- `flowrl_matching_replay`: the same with `replay_share=0.5` (a departure from both papers, after TBA): half of
  each step's groups replayed from the store of past rollouts, nothing generated for them.

GRPO's figures come from benchmark 2's runs (`distribution_matching.json`: the same seeds, settings and evaluation),
not trained again. Reported, means over seeds and per seed: held-out accuracy, distinct correct paths and total
variation to the target at the end; the rollouts generated; the rollouts and the training wall time (evaluation
excluded) at which the mean accuracy curve first reaches the matching arm's final mean accuracy (interpolated between
evaluations); seconds per step.

Targets (issue 19), replay against matching without replay: the matching arm's final accuracy reached with at most
0.6x its generated rollouts; at least as many distinct correct paths and no larger TV at the end; less training wall
time to that accuracy; seconds per step at most 1.3x. Wall times compare only runs made side by side: run the two
arms at the same time, one process each (see the second command above), then this command reads both from the cache.
Writes `replay.json` and `replay.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from arms import COLORS, LABELS
from learning_rates import option_runner
from metrics import mean_curve, rollouts_to_reach, summarize
from reporting import command_line, pyplot, quiet, report_header, write_json
from run_options import add_arms_argument, add_run_arguments, parse_arms, resolve_run_arguments, run_settings
from runs import REPO, run_summary


ARMS = ("flowrl_matching", "flowrl_matching_replay")
BASELINE, REPLAY = ARMS
ROLLOUTS_RATIO_MAX = 0.6
STEP_TIME_RATIO_MAX = 1.3


def final(records: list[dict], key) -> dict:
    return summarize([key(r["curve"][-1]) for r in records])


def reach(records: list[dict], threshold: float, x: str) -> float | None:
    """`x` (rollouts_generated or train_seconds) at which the arm's mean accuracy curve first reaches `threshold`."""
    curves = [r["curve"] for r in records]
    xs, accuracies = mean_curve(curves, x), mean_curve(curves, "accuracy")
    return rollouts_to_reach(xs, accuracies, threshold)


COMPARE = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b}


def check(value, comparison: str, threshold) -> dict:
    met = value is not None and COMPARE[comparison](value, threshold)
    return {"value": value, "threshold": threshold, "comparison": comparison, "met": met}


def grpo_reference(path) -> dict | None:
    """GRPO's final figures from benchmark 2's JSON, if it is there (same seeds, settings and evaluation)."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    records = report["runs"].get("grpo")
    if not records:
        return None
    return {
        "source": str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path),
        "seeds": report["settings"]["seeds"],
        "steps": report["settings"]["steps"],
        "accuracy": final(records, lambda p: p["accuracy"]),
        "distinct_correct_paths": final(records, lambda p: p["distinct_correct_paths"]),
        "tv": final(records, lambda p: p["target"]["tv"]),
        "rollouts_generated": final(records, lambda p: p["rollouts_generated"]),
    }


def plot(runs: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        ("rollouts_generated", lambda p: 100 * p["accuracy"], "rollouts generated", "held-out accuracy (avg@k, %)"),
        ("train_seconds", lambda p: 100 * p["accuracy"], "training wall time (s)", "held-out accuracy (avg@k, %)"),
        ("rollouts_generated", lambda p: p["target"]["tv"], "rollouts generated", "TV to the target"),
    )
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels):
        for name, records in runs.items():
            for record in records:
                curve = record["curve"]
                ax.plot([p[x] for p in curve], [y(p) for p in curve], color=COLORS[name], alpha=0.25, lw=0.8)
            curves = [r["curve"] for r in records]
            xs = mean_curve(curves, x)
            ys = [sum(y(c[i]) for c in curves) / len(curves) for i in range(len(xs))]
            ax.plot(xs, ys, color=COLORS[name], lw=2, label=LABELS[name])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("FlowRL matching with and without replay (thin: seeds, thick: mean; held-out, temperature 1.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_arms_argument(parser, ARMS)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="both arms' (benchmark 2's choice: 1e-4)")
    args = parser.parse_args(argv)
    try:
        arms = parse_arms(args.arms, ARMS)
    except ValueError as error:
        parser.error(str(error))
    seeds, spec, output_dir = resolve_run_arguments(args)
    quiet()
    start = time.perf_counter()
    overrides = ("--learning_rate", f"{args.learning_rate:g}")
    run = option_runner(args, spec)
    runs = {name: [] for name in arms}
    for seed in seeds:  # interleaved, so that a slow spell of the machine does not fall on one arm
        for name in arms:
            runs[name].append(run(name, seed, overrides))

    summary = {
        name: {
            "accuracy": final(records, lambda p: p["accuracy"]),
            "distinct_correct_paths": final(records, lambda p: p["distinct_correct_paths"]),
            "tv": final(records, lambda p: p["target"]["tv"]),
            "rollouts_generated": final(records, lambda p: p["rollouts_generated"]),
            "train_seconds": summarize([r["train_seconds"] for r in records]),
            "seconds_per_step": summarize([r["seconds_per_step"] for r in records]),
        }
        for name, records in runs.items()
    }
    checks = {}
    if set(ARMS) <= set(runs):
        base, replay = summary[BASELINE], summary[REPLAY]
        threshold = base["accuracy"]["mean"]
        reached = {
            name: {x: reach(runs[name], threshold, x) for x in ("rollouts_generated", "train_seconds")}
            for name in ARMS
        }
        for name in ARMS:
            summary[name]["to_baseline_accuracy"] = reached[name]
        base_rollouts = reached[BASELINE]["rollouts_generated"]
        replay_rollouts = reached[REPLAY]["rollouts_generated"]
        ratio = None if replay_rollouts is None or not base_rollouts else replay_rollouts / base_rollouts
        base_time, replay_time = reached[BASELINE]["train_seconds"], reached[REPLAY]["train_seconds"]
        checks = {
            "rollouts_ratio": check(ratio, "<=", ROLLOUTS_RATIO_MAX),
            "paths": check(replay["distinct_correct_paths"]["mean"], ">=", base["distinct_correct_paths"]["mean"]),
            "tv": check(replay["tv"]["mean"], "<=", base["tv"]["mean"]),
            "wall_time_ratio": check(
                None if replay_time is None or not base_time else replay_time / base_time, "<", 1.0
            ),
            "step_time_ratio": check(
                replay["seconds_per_step"]["mean"] / base["seconds_per_step"]["mean"], "<=", STEP_TIME_RATIO_MAX
            ),
        }

    grpo = grpo_reference(output_dir / "distribution_matching.json")
    print(f"\nEnd of training, means over seeds {seeds} (per seed):")
    rows = (
        ("held-out accuracy (%)", "accuracy", 100.0, "{:.1f}"),
        ("distinct correct paths", "distinct_correct_paths", 1.0, "{:.2f}"),
        ("TV to the target", "tv", 1.0, "{:.3f}"),
        ("rollouts generated", "rollouts_generated", 1.0, "{:.0f}"),
        ("training wall time (s)", "train_seconds", 1.0, "{:.0f}"),
        ("seconds per step", "seconds_per_step", 1.0, "{:.2f}"),
    )
    for title, key, scale, fmt in rows:
        cells = [
            f"{LABELS[n]}: {fmt.format(scale * summary[n][key]['mean'])} "
            f"({', '.join(fmt.format(scale * v) for v in summary[n][key]['per_seed'])})"
            for n in arms
        ]
        if grpo and key in grpo:
            cells.append(f"GRPO (benchmark 2): {fmt.format(scale * grpo[key]['mean'])}")
        print(f"  {title}: " + "; ".join(cells))
    for name, c in checks.items():
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        print(f"  {name}: {value} (target {c['comparison']} {c['threshold']:.3f}): {'met' if c['met'] else 'MISSED'}")

    settings = run_settings(args, seeds, spec, arms)
    settings["learning_rate"] = args.learning_rate
    report = report_header("replay", args.smoke, settings, command_line(__file__, argv))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "summary": summary,
            "checks": checks,
            "grpo": grpo,
            "runs": {name: [run_summary(r) for r in records] for name, records in runs.items()},
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "replay.json", report)
    plot(runs, output_dir / "replay.png")
    print(f"\nwrote {output_dir / 'replay.json'} and replay.png")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
