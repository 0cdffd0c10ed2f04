"""Benchmark 3: does ExGRPO reach GRPO's accuracy from fewer rollouts?

    python benchmarks/bench_experience.py                 # 3 seeds x 300 steps per trainer
    python benchmarks/bench_experience.py --smoke         # a few seconds' check that it runs

ExGRPO and GRPO train the embedded tiny model on the built-in arithmetic task with the recipes' embedded settings
(`recipes/configs/embedded/{exgrpo,grpo}_arithmetic.yaml`), with the same seeds; a callback measures held-out
accuracy every `--eval-every` steps (see `arithmetic_runs.py`; GRPO's runs are the same as benchmark 2's and are
reused from the run cache when it holds them).

Rollouts are counted where TRL generates them. Both trainers generate 64 completions per step; ExGRPO then replaces
one fresh completion of each replayed group by the stored trajectory it replays, so it *generates* as many rollouts
as GRPO but *uses* fewer fresh ones. Both counts are reported; "rollouts" without qualification means generated.

- Rollouts to reach GRPO's final accuracy: the first crossing of GRPO's final (last evaluation) accuracy by
  ExGRPO's accuracy curve, interpolated linearly between evaluation points, divided by the rollouts GRPO generated in
  its whole run. Computed on the curves averaged over seeds (the target's figure) and per seed (each seed against
  GRPO's run of the same seed). For reference, also the rollouts GRPO's own curve needed to first reach that value.
- Accuracy at equal rollouts: both curves at each evaluation point (same rollouts generated).

Ablation (on by default, `--no-ablation` skips it): ExGRPO with `replay_ratio 0`, i.e. the same trainer, loss (Dr. GRPO
aggregation, no std scaling of the advantage, fresh tokens unclipped after the switch) and retirement of solved
questions, without replay. It is not part of the target; it separates what replay does from what ExGRPO's other
defaults do, against GRPO's (DAPO aggregation, std-scaled advantages).

Target (issue 6): at most 0.7x GRPO's rollouts. Prints the figures and whether the target is met, and writes
`experience.json` and `experience.png` to `--output-dir`. Nothing is tuned to meet the target.
"""

import argparse
import sys
import time

import arithmetic_runs as ar


TRAINERS = ("grpo", "exgrpo")
ROLLOUTS_TARGET = 0.7
ABLATION = "exgrpo_no_replay"  # the arm of arithmetic_runs.ARMS: ExGRPO with --replay_ratio 0.0


def crossing(grpo_curves: list[list[dict]], exgrpo_curves: list[list[dict]], x_key: str) -> dict:
    """Rollouts (of kind `x_key`) ExGRPO needs to reach GRPO's final accuracy, both averaged over the given runs."""
    grpo_acc = ar.mean_curve(grpo_curves, "accuracy")
    grpo_x = ar.mean_curve(grpo_curves, "rollouts_generated")
    exgrpo_acc = ar.mean_curve(exgrpo_curves, "accuracy")
    exgrpo_x = ar.mean_curve(exgrpo_curves, x_key)
    threshold = grpo_acc[-1]
    reached = ar.rollouts_to_reach(exgrpo_x, exgrpo_acc, threshold)
    grpo_first = ar.rollouts_to_reach(grpo_x, grpo_acc, threshold)
    return {
        "grpo_final_accuracy": threshold,
        "grpo_rollouts": grpo_x[-1],
        "grpo_first_reach_rollouts": grpo_first,
        "exgrpo_rollouts_to_reach": reached,
        "ratio": None if reached is None else reached / grpo_x[-1],
        "ratio_to_grpo_first_reach": None if reached is None or not grpo_first else reached / grpo_first,
        "exgrpo_final_accuracy": exgrpo_acc[-1],
        "exgrpo_final_rollouts": exgrpo_x[-1],
    }


def fmt_ratio(value) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ar.add_run_arguments(parser)
    parser.add_argument("--no-ablation", action="store_true", help="skip the ExGRPO runs with replay_ratio 0")
    args = parser.parse_args(argv)
    seeds, spec, output_dir = ar.resolve_run_arguments(args)
    ar.quiet()
    start = time.perf_counter()

    runs = {name: [] for name in TRAINERS}
    ablation_key = ABLATION
    ablation_overrides = list(ar.ARMS[ABLATION].overrides)
    if not args.no_ablation:
        runs[ablation_key] = []
    for seed in seeds:
        for name in TRAINERS:
            runs[name].append(
                ar.tracked_run(name, seed, args.steps, spec, cache_dir=args.cache_dir, use_cache=not args.no_cache)
            )
        if not args.no_ablation:
            runs[ablation_key].append(
                ar.tracked_run(
                    ablation_key, seed, args.steps, spec, cache_dir=args.cache_dir, use_cache=not args.no_cache
                )
            )
    grpo_curves = [r["curve"] for r in runs["grpo"]]
    exgrpo_curves = [r["curve"] for r in runs["exgrpo"]]

    mean = crossing(grpo_curves, exgrpo_curves, "rollouts_generated")
    mean_fresh = crossing(grpo_curves, exgrpo_curves, "fresh_rollouts_used")
    per_seed = [
        {"seed": seed, **crossing([g], [e], "rollouts_generated")}
        for seed, g, e in zip(seeds, grpo_curves, exgrpo_curves)
    ]
    per_seed_fresh = [
        {"seed": seed, **crossing([g], [e], "fresh_rollouts_used")}
        for seed, g, e in zip(seeds, grpo_curves, exgrpo_curves)
    ]
    equal = [
        {
            "step": int(g["step"]),
            "rollouts_generated": g["rollouts_generated"],
            "exgrpo_fresh_rollouts_used": e["fresh_rollouts_used"],
            "grpo_accuracy": g["accuracy"],
            "exgrpo_accuracy": e["accuracy"],
        }
        for g, e in zip(_mean_points(grpo_curves), _mean_points(exgrpo_curves))
    ]
    ablation = None
    if not args.no_ablation:
        plain_curves = [r["curve"] for r in runs[ablation_key]]
        for point, p in zip(equal, _mean_points(plain_curves)):
            point["exgrpo_no_replay_accuracy"] = p["accuracy"]
        ablation = {
            "description": "ExGRPO with replay_ratio 0: ExGRPO's loss and retirement, no replay (not in the target)",
            "overrides": ablation_overrides,
            "final_accuracy": ar.summarize([c[-1]["accuracy"] for c in plain_curves]),
            "exgrpo_minus_no_replay_final_per_seed": [
                e[-1]["accuracy"] - c[-1]["accuracy"] for e, c in zip(exgrpo_curves, plain_curves)
            ],
            "no_replay_to_reach_grpo_final": crossing(grpo_curves, plain_curves, "rollouts_generated"),
            # ExGRPO against its own trainer without replay: rollouts to reach the no-replay run's final accuracy
            "exgrpo_to_reach_no_replay_final": crossing(plain_curves, exgrpo_curves, "rollouts_generated"),
        }
    final_gap = [e[-1]["accuracy"] - g[-1]["accuracy"] for g, e in zip(grpo_curves, exgrpo_curves)]
    met = mean["ratio"] is not None and mean["ratio"] <= ROLLOUTS_TARGET
    target = {
        "description": "ExGRPO reaches GRPO's final held-out accuracy with at most 0.7x GRPO's generated rollouts",
        "target": ROLLOUTS_TARGET,
        "ratio": mean["ratio"],
        "ratio_per_seed": [s["ratio"] for s in per_seed],
        "met": met,
        "shortfall": None if met or mean["ratio"] is None else mean["ratio"] - ROLLOUTS_TARGET,
    }
    replay = {
        "replayed_rows_fraction": ar.summarize(
            [r["rollouts_replayed"] / r["rollouts_generated"] for r in runs["exgrpo"]]
        ),
        "per_seed": [r.get("replay") for r in runs["exgrpo"]],
    }

    print(f"\nHeld-out accuracy at equal rollouts generated (mean over seeds {seeds}):")
    header = f"{'step':>5s} {'rollouts':>9s} {'GRPO':>7s} {'ExGRPO':>7s} {'diff':>6s} {'fresh used':>11s}"
    print(header + ("   ExGRPO, replay_ratio 0" if ablation else ""))
    for p in equal:
        print(
            f"{p['step']:5d} {p['rollouts_generated']:9.0f} {100 * p['grpo_accuracy']:6.1f}% "
            f"{100 * p['exgrpo_accuracy']:6.1f}% {100 * (p['exgrpo_accuracy'] - p['grpo_accuracy']):+6.1f} "
            f"{p['exgrpo_fresh_rollouts_used']:11.0f}"
            + (f"   {100 * p['exgrpo_no_replay_accuracy']:6.1f}%" if ablation else "")
        )
    print(
        f"\nExGRPO - GRPO final accuracy per seed: {', '.join(f'{100 * g:+.1f}' for g in final_gap)} points; "
        f"ExGRPO replaced {100 * replay['replayed_rows_fraction']['mean']:.1f}% of its generated rows by replays."
    )
    print(
        f"GRPO final accuracy {100 * mean['grpo_final_accuracy']:.1f}% after {mean['grpo_rollouts']:.0f} rollouts "
        f"(its own curve first reached it at {mean['grpo_first_reach_rollouts']:.0f})."
    )
    if mean["exgrpo_rollouts_to_reach"] is None:
        reached = f"ExGRPO did not reach it within {mean['exgrpo_final_rollouts']:.0f} generated rollouts"
    else:
        reached = (
            f"ExGRPO reached it after {mean['exgrpo_rollouts_to_reach']:.0f} generated rollouts, "
            f"{fmt_ratio(mean['ratio'])} GRPO's"
        )
    print(
        f"{reached} (per seed: {', '.join(fmt_ratio(s['ratio']) for s in per_seed)}); in fresh rollouts used "
        f"{fmt_ratio(mean_fresh['ratio'])} (per seed: {', '.join(fmt_ratio(s['ratio']) for s in per_seed_fresh)})."
    )
    verdict = (
        "met"
        if met
        else ("MISSED (not reached)" if mean["ratio"] is None else f"MISSED by {target['shortfall']:.2f}x")
    )
    print(f"Target: at most {ROLLOUTS_TARGET}x GRPO's rollouts: {fmt_ratio(mean['ratio'])}, {verdict}")
    if ablation:
        own = ablation["exgrpo_to_reach_no_replay_final"]
        print(
            f"Ablation, ExGRPO with replay_ratio 0: final accuracy {100 * ablation['final_accuracy']['mean']:.1f}% "
            f"({', '.join(f'{100 * v:.1f}' for v in ablation['final_accuracy']['per_seed'])}); ExGRPO minus it per "
            f"seed: {', '.join(f'{100 * d:+.1f}' for d in ablation['exgrpo_minus_no_replay_final_per_seed'])} points; "
            f"ExGRPO {'never reached' if own['ratio'] is None else 'reached'} its final accuracy "
            f"({100 * own['grpo_final_accuracy']:.1f}%)"
            + ("" if own["ratio"] is None else f" with {own['ratio']:.2f}x its rollouts")
            + "; rollouts for it to reach GRPO's final accuracy: "
            f"{fmt_ratio(ablation['no_replay_to_reach_grpo_final']['ratio'])} of GRPO's."
        )

    report = ar.report_header("experience", args.smoke, ar.run_settings(args, seeds, spec, list(runs)))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "to_reach_grpo_final": {"mean_curves": mean, "per_seed": per_seed},
            "to_reach_grpo_final_fresh": {"mean_curves": mean_fresh, "per_seed": per_seed_fresh},
            "equal_rollouts": equal,
            "final_accuracy": {
                name: ar.summarize([r["curve"][-1]["accuracy"] for r in runs[name]]) for name in TRAINERS
            },
            "final_accuracy_gap_per_seed": final_gap,
            "replay": replay,
            "ablation_no_replay": ablation,
            "target": target,
            "runs": {name: [ar.run_summary(r) for r in records] for name, records in runs.items()},
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    ar.write_json(output_dir / "experience.json", report)
    plot(runs, mean, output_dir / "experience.png")
    print(f"\nwrote {output_dir / 'experience.json'} and experience.png")
    return report


def _mean_points(curves: list[list[dict]]) -> list[dict]:
    keys = ("step", "rollouts_generated", "fresh_rollouts_used", "accuracy")
    return [dict(zip(keys, values)) for values in zip(*(ar.mean_curve(curves, key) for key in keys))]


def plot(runs: dict, mean: dict, path) -> None:
    plt = ar.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, x_key, xlabel in (
        (axes[0], "rollouts_generated", "rollouts generated"),
        (axes[1], "fresh_rollouts_used", "fresh rollouts used (ExGRPO: generated minus replaced by replays)"),
    ):
        ar.plot_metric(ax, runs, lambda p: 100 * p["accuracy"], x=x_key, ylabel="held-out accuracy (avg@k, %)")
        ax.set_xlabel(xlabel)
        ax.axhline(100 * mean["grpo_final_accuracy"], color="gray", linestyle="--", linewidth=1)
    if mean["exgrpo_rollouts_to_reach"] is not None:
        axes[0].axvline(mean["exgrpo_rollouts_to_reach"], color=ar.COLORS["exgrpo"], linestyle=":", linewidth=1)
        axes[0].set_title(
            f"ExGRPO reaches GRPO's final accuracy at {fmt_ratio(mean['ratio'])} its rollouts", fontsize=10
        )
    else:
        axes[0].set_title("ExGRPO does not reach GRPO's final accuracy", fontsize=10)
    axes[0].legend()
    fig.suptitle("ExGRPO vs GRPO on the embedded arithmetic task (held-out, temperature 1.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
