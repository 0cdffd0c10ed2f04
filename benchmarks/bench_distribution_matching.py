"""Benchmark 2: does FlowRL keep more distinct correct reasoning paths than GRPO, at the same accuracy?

    python benchmarks/bench_distribution_matching.py                 # 4 arms x 3 seeds x 300 steps, each at its rate
    python benchmarks/bench_distribution_matching.py --steps 600 --learning-rates 1e-4 \
        --arms grpo,grpo_kl,flowrl,flowrl_matching,flowrl_matching_b5   # 600 steps at one rate, with beta 5
    python benchmarks/bench_distribution_matching.py --seeds 0,1 --steps 100 --arms grpo,flowrl_matching
    python benchmarks/bench_distribution_matching.py --smoke         # a check that it runs (every arm, 2 steps)

Four arms (`ARMS`; `--arms` picks others of `arms.ARMS`) train the embedded tiny model on the built-in arithmetic task
with the recipes' embedded settings (`recipes/configs/embedded/{grpo,flowrl}_arithmetic.yaml`: 8 problems x 8
completions per step, 300 steps, temperature 1.0, the math-verify reward), each at its own learning rate
(`learning_rates.py`), with the same seeds:

- `grpo`: GRPO as the recipe has it (no KL term);
- `grpo_kl`: GRPO with a KL term of coefficient 1/15 (`--beta 0.0667`). With the advantage as reward term and β = 15,
  the official FlowRL objective's per-sample gradient is GRPO's plus a squared log-ratio pull toward the reference of
  weight about 1/β: this arm is its fair baseline. TRL's default KL estimator and loss aggregation are kept;
- `flowrl`: FlowRL's official objective (`--objective official --beta 15`), the paper's loss;
- `flowrl_matching`: FlowRL's matching objective at its preset (`--objective matching --beta 15`), whose fixed point is
  p*, here nearly the reference restricted to correct answers;
- `flowrl_matching_b5` (only with `--arms`): the matching objective with β = 5, a softer target (correct answers
  e^5 times more likely than under the reference, relative to wrong ones) whose reward term is a third as noisy.

Every `--eval-every` steps a callback samples `--eval-samples` completions at temperature 1.0 for each of
`--eval-problems` fixed held-out problems and measures (see `heldout.py` and `metrics.py`):

- accuracy (avg@k, the mean correctness of the samples), pass@k and the rate of samples writing a valid path;
- distinct correct paths per problem: how many different valid reasoning paths (exact path ids of the task) the
  correct samples of a problem take, averaged over all problems (0 for an unsolved problem);
- entropy (nats) of the frequencies of the correct paths of a problem, averaged over the problems with a correct
  sample;
- over each problem's enumerated valid paths (all correct, same reward, so the target p* among them is the reference
  renormalised): total variation and both KL divergences between the policy and the target, averaged over problems.

Targets (issue 18), for `flowrl_matching` against `grpo`, each at its chosen learning rate, on the means over seeds
at the end of training: distinct correct paths at least 2.5x GRPO's, accuracy no more than 2 points below GRPO's,
total variation to the target at most 0.3; the same figures, as information, for `flowrl_matching_b5`. Also
reported: issue 9's former targets for `flowrl_matching` (3x the paths) and issue 6's for `flowrl` (2x the paths,
within 5 points). Prints every figure, per seed and mean, and each target met or missed with its margin, and writes
`distribution_matching.json`, `.png` (curves) and `_tradeoff.png` (accuracy against paths) to `--output-dir`; runs
of another length than the recipes' 300 steps write `distribution_matching_<N>steps.*` instead, beside them (the
README shows those longer than 300 steps). Nothing is tuned to meet a target.
"""

import argparse
import sys
import time
from dataclasses import asdict, dataclass

from arms import ARMS as ALL_ARMS
from arms import COLORS, LABELS
from learning_rates import (
    add_learning_rate_arguments,
    choice_report,
    learning_rate_protocol,
    option_runner,
    print_sweep,
    resolve_learning_rates,
)
from metrics import summarize
from reporting import command_line, plot_metric, pyplot, quiet, report_header, write_json
from run_options import add_arms_argument, add_run_arguments, parse_arms, resolve_run_arguments, run_settings
from runs import run_summary


ARMS = ("grpo", "grpo_kl", "flowrl", "flowrl_matching")
BASELINE = "grpo"
RECIPE_STEPS = 300  # the embedded recipes' max_steps
# (key of a curve point or of its "target" dict, label, scale for display, format)
METRICS = (
    ("accuracy", "accuracy (avg@k, %)", 100.0, "{:.1f}"),
    ("pass_at_k", "pass@k (%)", 100.0, "{:.1f}"),
    ("distinct_correct_paths", "distinct correct paths / problem", 1.0, "{:.2f}"),
    ("distinct_correct_paths_solved", "... / solved problem", 1.0, "{:.2f}"),
    ("correct_path_entropy", "entropy over correct paths (nats)", 1.0, "{:.3f}"),
    ("valid_path_rate", "samples writing a valid path (%)", 100.0, "{:.1f}"),
    ("distinct_answers", "distinct final answers / problem", 1.0, "{:.2f}"),
    ("tv", "TV to the target", 1.0, "{:.3f}"),
    ("kl", "KL(policy || target) (nats)", 1.0, "{:.3f}"),
    ("kl_reverse", "KL(target || policy) (nats)", 1.0, "{:.3f}"),
    ("policy_mass", "probability mass on valid paths", 1.0, "{:.3f}"),
)
TARGET_KEYS = ("tv", "kl", "kl_reverse", "policy_mass")  # read from a curve point's "target" dict


@dataclass(frozen=True)
class Targets:
    """An arm against the baseline: paths ratio at least `paths_ratio`, accuracy at most `accuracy_drop_points`
    below, and (when set) total variation to the target at most `tv_max`."""

    name: str
    paths_ratio: float
    accuracy_drop_points: float
    tv_max: float | None = None


ISSUE18 = Targets("issue 18", paths_ratio=2.5, accuracy_drop_points=2.0, tv_max=0.3)
ISSUE9 = Targets("issue 9", paths_ratio=3.0, accuracy_drop_points=2.0, tv_max=0.3)
ISSUE6 = Targets("issue 6", paths_ratio=2.0, accuracy_drop_points=5.0)
# (arm, targets, role): what each target set is evaluated on
EVALUATIONS = (
    ("flowrl_matching", ISSUE18, "target"),
    ("flowrl_matching", ISSUE9, "superseded"),
    ("flowrl_matching_b5", ISSUE18, "information"),
    ("flowrl", ISSUE6, "superseded"),
)


def point_value(point: dict, key: str):
    return point["target"][key] if key in TARGET_KEYS else point[key]


def final_summary(records: list[dict]) -> dict:
    """Each metric of the last evaluation point, over seeds (a metric undefined for some seed is left out)."""
    finals = [r["curve"][-1] for r in records]
    return {
        key: summarize([point_value(p, key) for p in finals])
        for key, _, _, _ in METRICS
        if all(point_value(p, key) is not None for p in finals)
    }


def check_value(value, per_seed, threshold: float, at_least: bool) -> dict:
    """`value` against `threshold`; `margin` is how far it clears it (negative: by how much it misses)."""
    margin = None if value is None else (value - threshold if at_least else threshold - value)
    return {
        "value": value,
        "per_seed": per_seed,
        "threshold": threshold,
        "comparison": ">=" if at_least else "<=",
        "met": margin is not None and margin >= 0,
        "margin": margin,
    }


def evaluate_targets(final: dict, arm: str, targets: Targets, baseline: str = BASELINE, role: str = "target") -> dict:
    """`targets` for `arm` against `baseline`, from `final_summary` results of each (means over seeds; per-seed
    figures pair the runs of the same seed).

    Checks: `paths_ratio` (arm's distinct correct paths / the baseline's; undefined, and met only if the arm has some,
    when the baseline has none), `accuracy_gap` (arm - baseline, in points) and, with `targets.tv_max`, `tv`.
    """
    a, b = final[arm], final[baseline]
    arm_paths, base_paths = a["distinct_correct_paths"], b["distinct_correct_paths"]
    ratio = arm_paths["mean"] / base_paths["mean"] if base_paths["mean"] > 0 else None
    per_seed = [x / y if y > 0 else None for x, y in zip(arm_paths["per_seed"], base_paths["per_seed"])]
    paths = check_value(ratio, per_seed, targets.paths_ratio, at_least=True)
    if ratio is None:  # the baseline found no correct path: any correct path is infinitely many times more
        paths["met"] = arm_paths["mean"] > 0
    gap = 100 * (a["accuracy"]["mean"] - b["accuracy"]["mean"])
    gaps = [100 * (x - y) for x, y in zip(a["accuracy"]["per_seed"], b["accuracy"]["per_seed"])]
    checks = {
        "paths_ratio": paths,
        "accuracy_gap": check_value(gap, gaps, -targets.accuracy_drop_points, at_least=True),
    }
    if targets.tv_max is not None:
        checks["tv"] = check_value(a["tv"]["mean"], a["tv"]["per_seed"], targets.tv_max, at_least=False)
    return {
        "targets": targets.name,
        "definition": asdict(targets),
        "role": role,
        "arm": arm,
        "baseline": baseline,
        "checks": checks,
        "met": all(c["met"] for c in checks.values()),
    }


def describe_check(name: str, check: dict, baseline: str = "the baseline") -> str:
    """One line of the console report for a check of `evaluate_targets`."""
    fmt = {"paths_ratio": "{:.2f}x", "accuracy_gap": "{:+.1f} points", "tv": "{:.3f}"}[name]
    title = {
        "paths_ratio": f"distinct correct paths / {baseline}'s",
        "accuracy_gap": f"accuracy - {baseline}'s",
        "tv": "TV to the target",
    }[name]
    value = "undefined (the baseline has none)" if check["value"] is None else fmt.format(check["value"])
    seeds = ", ".join("-" if v is None else fmt.format(v) for v in check["per_seed"])
    if check["margin"] is None:
        verdict = "met" if check["met"] else "MISSED"
    else:
        margin = fmt.format(abs(check["margin"])).lstrip("+")
        verdict = f"met (margin {margin})" if check["met"] else f"MISSED by {margin}"
    return f"{title}: {value} (per seed {seeds}); target {check['comparison']} {fmt.format(check['threshold'])}: {verdict}"


def print_report(initial: dict, final: dict, evaluations: list[dict], seeds: list[int], arms: list[str]) -> None:
    width, column = 36, 21
    print(
        "\nArms: "
        + "; ".join(f"{name} = {LABELS[name]} ({' '.join(ALL_ARMS[name].overrides) or 'recipe'})" for name in arms)
    )
    tables = [("mean over seeds", lambda s, scale, fmt: fmt.format(scale * s["mean"]))]
    if len(seeds) > 1:
        tables.append(("per seed", lambda s, scale, fmt: "/".join(fmt.format(scale * v) for v in s["per_seed"])))
    for title, cell in tables:
        print(f"\nHeld-out figures at the end of training, {title} (seeds {seeds}):")
        print(f"{'':{width}s} {'initial':>8s} " + " ".join(f"{name:>{column}s}" for name in arms))
        for key, label, scale, fmt in METRICS:
            start = point_value(initial, key)
            cells = [cell(final[name][key], scale, fmt) if key in final[name] else "-" for name in arms]
            start_text = "-" if start is None else fmt.format(scale * start)
            print(f"{label:{width}s} {start_text:>8s} " + " ".join(f"{c:>{column}s}" for c in cells))
    for evaluation in evaluations:
        print(
            f"\n{evaluation['targets']} ({evaluation['role']}): {LABELS[evaluation['arm']]} against "
            f"{LABELS[evaluation['baseline']]}: {'met' if evaluation['met'] else 'MISSED'}"
        )
        for name, check in evaluation["checks"].items():
            print("  " + describe_check(name, check, LABELS[evaluation["baseline"]]))


def mean_point(records: list[dict], step: int | None = None) -> tuple[float, float] | None:
    """The mean (distinct correct paths, held-out accuracy in %) over runs at `step` (None: the end), or None when some
    run was not evaluated at that step."""
    points = [
        r["curve"][-1] if step is None else next((p for p in r["curve"] if p["step"] == step), None) for r in records
    ]
    if not points or None in points:
        return None
    return (
        sum(p["distinct_correct_paths"] for p in points) / len(points),
        sum(100 * p["accuracy"] for p in points) / len(points),
    )


def plot_tradeoff(
    runs: dict, path, sweep: dict | None = None, chosen: dict | None = None, earlier_step: int | None = None
) -> None:
    """Held-out accuracy against distinct correct paths at the end of training: each arm a point per seed, and
    (hollow, labelled with the rate) the first seed's runs at the learning rates not chosen. With `earlier_step`
    (runs longer than the recipes'), an arrow from each arm's mean at that step (hollow X) to its mean at the end."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    moved = {name: mean_point(records, earlier_step) for name, records in runs.items()} if earlier_step else {}
    for name, start in moved.items():
        if start is not None:
            ax.scatter([start[0]], [start[1]], facecolors="none", edgecolors=COLORS[name], marker="X", s=120)
            ax.annotate("", mean_point(runs[name]), start, arrowprops={"arrowstyle": "->", "color": COLORS[name]})
    others = False
    for name, by_rate in (sweep or {}).items():
        for lr, record in by_rate.items():
            if chosen and lr == chosen[name]:
                continue
            others = True
            point = record["curve"][-1]
            x, y = point["distinct_correct_paths"], 100 * point["accuracy"]
            ax.scatter([x], [y], facecolors="none", edgecolors=COLORS[name], s=40)
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, color=COLORS[name], xytext=(3, 3), textcoords="offset points")
    for name, records in runs.items():
        finals = [r["curve"][-1] for r in records]
        xs = [p["distinct_correct_paths"] for p in finals]
        ys = [100 * p["accuracy"] for p in finals]
        ax.scatter(xs, ys, color=COLORS[name], alpha=0.6, label=LABELS[name])
        ax.scatter(*zip(mean_point(records)), color=COLORS[name], marker="X", s=120, edgecolor="k")
    initial = next(iter(runs.values()))[0]["curve"][0]
    ax.scatter([initial["distinct_correct_paths"]], [100 * initial["accuracy"]], color="k", marker="*", s=150)
    ax.annotate(
        "initial model",
        (initial["distinct_correct_paths"], 100 * initial["accuracy"]),
        fontsize=8,
        ha="right",
        xytext=(-6, 0),
        textcoords="offset points",
    )
    ax.set_xlabel("distinct correct paths per held-out problem")
    ax.set_ylabel("held-out accuracy (avg@k, %)")
    legend = ["dots: seeds, X: mean"]
    if others:
        legend.append("hollow: other rates, first seed")
    if any(start is not None for start in moved.values()):
        legend.append(f"hollow X: mean at step {earlier_step}")
    ax.set_title(f"End of training, each arm at its learning rate ({'; '.join(legend)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(runs: dict, path) -> None:
    """Four figures against the training step, and two along training against held-out accuracy: how many paths and
    how much distance to the target each arm pays for its accuracy (an arm that barely trains stays near the
    reference, and so near the target among correct paths, at a low accuracy)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(18, 8.5))
    accuracy = (lambda p: 100 * p["accuracy"], "held-out accuracy (avg@k, %)")
    panels = (
        ("step", accuracy),
        ("step", ("distinct_correct_paths", "distinct correct paths per problem")),
        (accuracy, ("distinct_correct_paths", "distinct correct paths per problem")),
        ("step", (lambda p: p["correct_path_entropy"] or 0.0, "entropy over correct paths (nats)")),
        ("step", (lambda p: p["target"]["tv"], "total variation to the target")),
        (accuracy, (lambda p: p["target"]["tv"], "total variation to the target")),
    )
    for ax, (x, (y, ylabel)) in zip(axes.flat, panels):
        x, xlabel = ("step", "training step") if x == "step" else x
        plot_metric(ax, runs, y, x=x, ylabel=ylabel, xlabel=xlabel)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        "The arms on the embedded arithmetic task (held-out, temperature 1.0); right: along training, against accuracy"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_arms_argument(parser, ARMS)
    add_learning_rate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        arms = parse_arms(args.arms, ARMS)
    except ValueError as error:
        parser.error(str(error))
    seeds, spec, output_dir = resolve_run_arguments(args)
    learning_rates, spec = resolve_learning_rates(parser, args, spec)
    quiet()
    start = time.perf_counter()

    sweep, chosen, runs = learning_rate_protocol(arms, seeds, learning_rates, option_runner(args, spec))
    print_sweep(sweep, chosen)

    initial = runs[arms[0]][0]["curve"][0]  # every arm starts from the same model and sampling seed
    final = {name: final_summary(records) for name, records in runs.items()}
    evaluations = [
        evaluate_targets(final, arm, targets, role=role)
        for arm, targets, role in EVALUATIONS
        if arm in final and BASELINE in final
    ]
    print_report(initial, final, evaluations, seeds, arms)

    settings = run_settings(args, seeds, spec, arms)
    settings["learning_rates"] = {"choices": learning_rates, "chosen": chosen}
    report = report_header("distribution_matching", args.smoke, settings, command_line(__file__, argv))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "learning_rate_choice": choice_report(sweep, chosen),
            "initial": {key: point_value(initial, key) for key, _, _, _ in METRICS},
            "final": final,
            "evaluations": evaluations,
            "runs": {name: [run_summary(r) for r in records] for name, records in runs.items()},
        }
    )
    # Runs longer than the recipes' (issue 18: where each arm is at 600 steps) get files of their own, beside the
    # 300-step results rather than over them.
    stem = (
        "distribution_matching"
        if args.smoke or args.steps == RECIPE_STEPS
        else f"distribution_matching_{args.steps}steps"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / f"{stem}.json", report)
    plot(runs, output_dir / f"{stem}.png")
    earlier = RECIPE_STEPS if args.steps > RECIPE_STEPS and not args.smoke else None
    plot_tradeoff(runs, output_dir / f"{stem}_tradeoff.png", sweep, chosen, earlier_step=earlier)
    print(f"\nwrote {output_dir / stem}.json, .png and _tradeoff.png")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
