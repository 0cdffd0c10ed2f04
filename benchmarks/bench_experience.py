"""Benchmark 3: where does ExGRPO's experience pay off? Two regimes, the same rollout budget, and the paper's ablations.

    python benchmarks/bench_experience.py                       # both regimes, 3 seeds x 300 steps, scarce ablations,
                                                                # each main arm at its learning rate (3 rates)
    python benchmarks/bench_experience.py --ablation-seeds 0    # the ablations on seed 0 only (a smaller budget)
    python benchmarks/bench_experience.py --regimes scarce --ablations exgrpo_no_shaping
    python benchmarks/bench_experience.py --smoke               # a short check that it runs

ExGRPO's claim is more accuracy from the same rollouts by replaying past successes. The paper trains on OpenR1-Math
46k with 128 questions per step for 500 to 700 steps: an on-policy run sees each question about twice. The two regimes
put the built-in arithmetic task on either side of that (300 steps of 8 questions x 8 completions, 2,400 question
visits, in both):

- **scarce**: 800 training problems, so GRPO passes over the set 3 times, and a weaker starting model, so that the
  delayed start (replay only once a batch's accuracy exceeds 0.35) delays: the arithmetic model pre-trained for 700
  steps instead of 800 (`scripts/pretrain_tiny_model.py --steps 700 --num_threads 1`, the shipped model's settings
  otherwise; 29.4% held-out accuracy at the end of pre-training instead of 41.2%, 28.8% on the tracked problems),
  built here once and kept in the run cache. This is the regime of the paper. (With the earlier embedded model, a
  600-step checkpoint at 18% was too weak: on-policy training collapsed from it, 19% to 3% in 300 steps, and ExGRPO
  never reached its switch.)
- **plentiful**: the recipes' settings, 2,000 problems and the shipped model (43.8% on the tracked problems): no
  question is seen twice, and replay spends half of each batch on questions already seen.

Arms (`arms.ARMS`): GRPO and ExGRPO at the paper's defaults in both regimes, the same ExGRPO without replay
(`replay_ratio 0`: its loss and retirement alone) in both, ExGRPO with displaced questions requeued (a departure from
the paper, meant for plentiful fresh questions) in plentiful, and, in scarce, the paper's ablations one at a time
(`--ablations`). Every arm trains with the same steps and generates 64 completions per step; the main arms on every
seed, the ablations on `--ablation-seeds` (default: every seed), and each ablation is compared with GRPO and with
ExGRPO on its own seeds only.

Learning rates (issue 18, `learning_rates.py`): in each regime, every main arm chooses its rate among
`--learning-rates` on a validation split (train-split problems outside the regime's training set, never the held-out
ones), one run per rate with the first seed and the same steps for every arm; the other seeds run at the chosen rate.
The ablations run at the rate ExGRPO chose in that regime: an ablation removes one part and keeps everything else. The
plentiful regime's GRPO trains exactly as benchmark 2's GRPO arm (same recipe, model and rates); the run cache shares
the runs when both benchmarks also track alike (the same `--eval-every` and evaluation options).

Rollouts are counted where TRL generates them: ExGRPO generates as many as GRPO and then replaces one fresh completion
of each replayed group by the stored trajectory it replays, so it *uses* fewer fresh ones (both counts are reported;
"rollouts" alone means generated). Reported per regime, from held-out accuracy every `--eval-every` steps:

- accuracy against rollouts (curves, and the table at equal rollouts);
- rollouts to reach GRPO's final accuracy: the first crossing of GRPO's last-evaluation accuracy by the arm's curve,
  interpolated linearly, divided by GRPO's rollouts (on the curves averaged over seeds, and per seed);
- final accuracy and its gap to GRPO at equal rollouts, per seed;
- distinct problems trained (fresh and replayed), the most replays of one question, the step replay started.

Targets (issue 10): in the scarce regime, ExGRPO at the paper's defaults reaches GRPO's final accuracy with at most
0.7x its rollouts and ends at least 2 points above GRPO; in the plentiful regime, the best documented option ends no
more than 1 point below GRPO. Prints the figures and the verdicts, and writes `experience.json` and `experience.png`
to `--output-dir`. Nothing is tuned to meet the targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from arms import LABELS
from learning_rates import (
    add_learning_rate_arguments,
    choice_report,
    learning_rate_protocol,
    print_sweep,
    resolve_learning_rates,
)
from metrics import mean_curve, rollouts_to_reach, summarize
from reporting import command_line, plot_metric, pyplot, quiet, report_header, write_json
from run_options import add_run_arguments, parse_arms, resolve_run_arguments, run_settings
from runs import REPO, run_summary, tracked_run


ROLLOUTS_TARGET = 0.7
SCARCE_GAIN_POINTS = 2.0
PLENTIFUL_TOLERANCE_POINTS = 1.0
SCARCE_ABLATIONS = (
    "exgrpo_no_shaping",
    "exgrpo_no_is",
    "exgrpo_uniform_questions",
    "exgrpo_random_trajectory",
    "exgrpo_requeue",
)
WEAK_MODEL_STEPS = 700


@dataclass(frozen=True)
class Regime:
    description: str
    overrides: tuple[str, ...]  # recipe flags on top of each arm's
    weak_model: bool  # the earlier pre-training checkpoint instead of the shipped model
    arms: tuple[str, ...]


REGIMES = {
    "scarce": Regime(
        "800 training problems (3 passes for GRPO), a weaker start (pre-trained 700 steps)",
        ("--num_train_problems", "800"),
        True,
        ("grpo", "exgrpo", "exgrpo_no_replay"),
    ),
    "plentiful": Regime(
        "the recipes' 2,000 problems (no repeat), the shipped model",
        (),
        False,
        ("grpo", "exgrpo", "exgrpo_no_replay", "exgrpo_requeue"),
    ),
}


# -- pure functions ------------------------------------------------------------------------------------------------


def crossing(grpo_curves: list[list[dict]], curves: list[list[dict]], x_key: str = "rollouts_generated") -> dict:
    """Rollouts (of kind `x_key`) an arm needs to reach GRPO's final accuracy, both curves averaged over runs."""
    grpo_acc = mean_curve(grpo_curves, "accuracy")
    grpo_x = mean_curve(grpo_curves, "rollouts_generated")
    acc = mean_curve(curves, "accuracy")
    x = mean_curve(curves, x_key)
    threshold = grpo_acc[-1]
    reached = rollouts_to_reach(x, acc, threshold)
    return {
        "grpo_final_accuracy": threshold,
        "grpo_rollouts": grpo_x[-1],
        "grpo_first_reach_rollouts": rollouts_to_reach(grpo_x, grpo_acc, threshold),
        "rollouts_to_reach": reached,
        "ratio": None if reached is None else reached / grpo_x[-1],
        "final_accuracy": acc[-1],
        "final_rollouts": x[-1],
    }


def same_seeds(reference: list[dict], runs: list[dict]) -> list[dict]:
    """The runs of `reference` with the seeds of `runs`, in the order of `runs` (an arm is compared seed by seed)."""
    by_seed = {r["seed"]: r for r in reference}
    missing = [r["seed"] for r in runs if r["seed"] not in by_seed]
    if missing:
        raise ValueError(f"no reference run for seed(s) {missing}: run the reference arm on every seed of the others.")
    return [by_seed[r["seed"]] for r in runs]


def arm_summary(grpo_runs: list[dict], runs: list[dict], exgrpo_runs: list[dict] | None = None) -> dict:
    """An arm against GRPO in one regime (on the arm's seeds): rollouts to reach, final accuracy and gap, questions
    trained; with `exgrpo_runs`, also its gap to ExGRPO at the defaults on the same seeds (the ablations')."""
    grpo_runs = same_seeds(grpo_runs, runs)
    grpo_curves, curves = [r["curve"] for r in grpo_runs], [r["curve"] for r in runs]
    final = [c[-1]["accuracy"] for c in curves]
    gaps = [c[-1]["accuracy"] - g[-1]["accuracy"] for g, c in zip(grpo_curves, curves)]
    questions = [r.get("questions", {}) for r in runs]
    started = [_replay_start(r) for r in runs]
    summary = {
        "seeds": [r["seed"] for r in runs],
        "to_reach_grpo_final": crossing(grpo_curves, curves),
        "to_reach_grpo_final_fresh": crossing(grpo_curves, curves, "fresh_rollouts_used"),
        "to_reach_per_seed": [crossing([g], [c])["ratio"] for g, c in zip(grpo_curves, curves)],
        "final_accuracy": summarize(final),
        "gap_points": summarize([100 * g for g in gaps]),
        "distinct_questions": summarize([q.get("distinct_questions", 0) for q in questions]),
        "distinct_fresh_questions": [q.get("distinct_fresh_questions") for q in questions],
        "max_replays_per_question": [q.get("max_replays_per_question") for q in questions],
        "replayed_rows_fraction": summarize(
            [r["rollouts_replayed"] / r["rollouts_generated"] if r["rollouts_generated"] else 0.0 for r in runs]
        ),
        "replay_started_at_step": started,
    }
    if exgrpo_runs is not None:
        exgrpo = [r["curve"][-1]["accuracy"] for r in same_seeds(exgrpo_runs, runs)]
        summary["gap_to_exgrpo_points"] = summarize([100 * (f - e) for f, e in zip(final, exgrpo)])
    return summary


def _replay_start(record: dict) -> int | None:
    """The first logged step at which ExGRPO's replay phase was on (None: never, or not ExGRPO)."""
    for entry in record.get("train_log", []):
        if entry.get("replay/phase") == 1.0:
            return entry["step"]
    return None


def evaluate_targets(regimes: dict) -> dict:
    """Issue 10's targets from the per-regime summaries."""
    out = {}
    if "scarce" in regimes:
        exgrpo = regimes["scarce"]["arms"]["exgrpo"]
        ratio = exgrpo["to_reach_grpo_final"]["ratio"]
        gain = exgrpo["gap_points"]["mean"]
        out["scarce_rollouts"] = {
            "description": f"ExGRPO reaches GRPO's final accuracy with at most {ROLLOUTS_TARGET}x its rollouts",
            "value": ratio,
            "per_seed": exgrpo["to_reach_per_seed"],
            "threshold": ROLLOUTS_TARGET,
            "met": ratio is not None and ratio <= ROLLOUTS_TARGET,
        }
        out["scarce_gain"] = {
            "description": f"ExGRPO ends at least {SCARCE_GAIN_POINTS:.0f} points above GRPO at equal rollouts",
            "value": gain,
            "per_seed": exgrpo["gap_points"]["per_seed"],
            "threshold": SCARCE_GAIN_POINTS,
            "met": gain >= SCARCE_GAIN_POINTS,
        }
    if "plentiful" in regimes:
        options = {k: v for k, v in regimes["plentiful"]["arms"].items() if k != "grpo"}
        best = max(options, key=lambda k: options[k]["gap_points"]["mean"])
        gap = options[best]["gap_points"]["mean"]
        out["plentiful_best"] = {
            "description": f"the best ExGRPO option ends no more than {PLENTIFUL_TOLERANCE_POINTS:.0f} point below GRPO",
            "arm": best,
            "value": gap,
            "per_seed": options[best]["gap_points"]["per_seed"],
            "threshold": -PLENTIFUL_TOLERANCE_POINTS,
            "met": gap >= -PLENTIFUL_TOLERANCE_POINTS,
        }
    return out


# -- the weaker starting model -------------------------------------------------------------------------------------


def weak_model(cache_dir: Path, steps: int, smoke: bool, log=print) -> Path:
    """The arithmetic model pre-trained for `steps` steps (one thread, seed 0), built once into the run cache."""
    out = Path(cache_dir) / f"weak-model-steps{steps}{'-smoke' if smoke else ''}"
    if (out / "config.json").is_file() and (out / "pretraining.json").is_file():
        return out
    command = [
        sys.executable,
        str(REPO / "scripts" / "pretrain_tiny_model.py"),
        "--steps",
        str(steps),
        "--num_threads",
        "1",
        "--seed",
        "0",
        "--output_dir",
        str(out),
    ]
    if smoke:
        command += ["--warmup_steps", "1", "--eval_problems", "2", "--eval_samples", "2"]
    log(f"Pre-training the weaker starting model ({steps} steps) into {out}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL if smoke else None)
    return out


# -- report --------------------------------------------------------------------------------------------------------


def fmt_ratio(value) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def _verdict(check: dict, fmt) -> str:
    value = "not reached" if check["value"] is None else fmt(check["value"])
    return f"{check['description']}: {value} -> {'met' if check['met'] else 'MISSED'}"


def print_report(regimes: dict, targets: dict) -> None:
    for name, regime in regimes.items():
        print(f"\n== {name}: {regime['description']}")
        grpo = regime["arms"]["grpo"]
        print(
            f"GRPO: final accuracy {100 * grpo['final_accuracy']['mean']:.1f}% "
            f"({', '.join(f'{100 * v:.1f}' for v in grpo['final_accuracy']['per_seed'])}), "
            f"{grpo['distinct_questions']['mean']:.0f} distinct questions trained"
        )
        for arm, s in regime["arms"].items():
            if arm == "grpo":
                continue
            print(
                f"{LABELS[arm]}: final {100 * s['final_accuracy']['mean']:.1f}% "
                f"({', '.join(f'{100 * v:.1f}' for v in s['final_accuracy']['per_seed'])}), "
                f"minus GRPO {s['gap_points']['mean']:+.1f} points, to reach GRPO's final "
                f"{fmt_ratio(s['to_reach_grpo_final']['ratio'])} (per seed "
                f"{', '.join(fmt_ratio(r) for r in s['to_reach_per_seed'])}), "
                f"{s['distinct_questions']['mean']:.0f} distinct questions, replay from step "
                f"{s['replay_started_at_step']}"
                + (
                    f"; seeds {s['seeds']}, minus ExGRPO on them {s['gap_to_exgrpo_points']['mean']:+.1f} points"
                    if "gap_to_exgrpo_points" in s
                    else ""
                )
            )
    print()
    for key, check in targets.items():
        fmt = (lambda v: f"{v:.2f}x") if key == "scarce_rollouts" else (lambda v: f"{v:+.1f} points")
        suffix = f" ({LABELS[check['arm']]})" if "arm" in check else ""
        print(f"Target, {key}: {_verdict(check, fmt)}{suffix}")


def plot(regimes: dict, runs: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.4), squeeze=False)
    for ax, (name, regime) in zip(axes[0], regimes.items()):
        plot_metric(ax, runs[name], lambda p: 100 * p["accuracy"], x="rollouts_generated", ylabel="accuracy (%)")
        ax.axhline(100 * regime["arms"]["grpo"]["final_accuracy"]["mean"], color="gray", linestyle="--", lw=1)
        ax.set_xlabel("rollouts generated")
        ax.set_title(f"{name}: {regime['description']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("ExGRPO vs GRPO on the embedded arithmetic task: held-out accuracy against rollouts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_learning_rate_arguments(parser)
    parser.add_argument("--regimes", default="scarce,plentiful", help="comma-separated regimes (scarce, plentiful)")
    parser.add_argument(
        "--ablations",
        default=",".join(SCARCE_ABLATIONS),
        help="comma-separated ExGRPO arms run in the scarce regime besides GRPO, ExGRPO and no replay ('' for none)",
    )
    parser.add_argument(
        "--ablation-seeds",
        default=None,
        help="comma-separated seeds of the ablations (default: every seed of --seeds)",
    )
    parser.add_argument("--weak-model-steps", type=int, default=WEAK_MODEL_STEPS, help="pre-training steps (scarce)")
    args = parser.parse_args(argv)
    seeds, spec, output_dir = resolve_run_arguments(args)
    learning_rates, spec = resolve_learning_rates(parser, args, spec)
    quiet()
    start = time.perf_counter()
    names = [r for r in args.regimes.split(",") if r]
    unknown = set(names) - set(REGIMES)
    if unknown:
        raise SystemExit(f"Unknown regime(s) {sorted(unknown)}: use {list(REGIMES)}.")
    ablations = parse_arms(args.ablations, ()) if args.ablations else []
    ablation_seeds = seeds if args.ablation_seeds is None else [int(s) for s in args.ablation_seeds.split(",")]
    main_arms = set(REGIMES["scarce"].arms)
    if main_arms & set(ablations):
        raise SystemExit(
            f"--ablations {sorted(main_arms & set(ablations))} are main arms of the scarce regime (they choose their "
            "own learning rate); list only the ablations."
        )
    if len(set(ablation_seeds)) != len(ablation_seeds) or not set(ablation_seeds) <= set(seeds):
        raise SystemExit(
            f"--ablation-seeds {ablation_seeds} must be distinct and among --seeds {seeds} (they are compared per seed)."
        )
    if args.smoke:  # every kind of arm once, in as few runs as possible
        ablations = ablations[:1]

    regimes, runs, weak = {}, {}, None
    for name in names:
        regime = REGIMES[name]
        arms = list(regime.arms)
        if args.smoke and name == "plentiful":
            arms = ["grpo", "exgrpo_requeue"]
        regime_ablations = ablations if name == "scarce" else []
        model = None
        if regime.weak_model:
            steps = 2 if args.smoke else args.weak_model_steps
            weak = weak_model(Path(args.cache_dir), steps, args.smoke)
            model = weak

        def run(arm, seed, overrides, regime=regime, model=model):
            return tracked_run(
                arm,
                seed,
                args.steps,
                spec,
                cache_dir=args.cache_dir,
                use_cache=not args.no_cache,
                extra_overrides=[*regime.overrides, *overrides],
                model_path=model,
            )

        sweep, chosen, runs[name] = learning_rate_protocol(arms, seeds, learning_rates, run)
        print(f"\n== {name}: learning rates")
        print_sweep(sweep, chosen)
        # An ablation removes one part of ExGRPO and keeps everything else, its learning rate included: each runs at
        # the rate ExGRPO chose, so that the difference is the part's alone.
        for seed in ablation_seeds:
            for arm in regime_ablations:
                rate = ("--learning_rate", f"{chosen['exgrpo']:g}")
                runs[name].setdefault(arm, []).append(run(arm, seed, rate))
        grpo = runs[name]["grpo"]
        regimes[name] = {
            "description": regime.description,
            "overrides": list(regime.overrides),
            "model": "weak" if regime.weak_model else "embedded",
            "learning_rate_choice": choice_report(sweep, chosen),
            "arms": {
                arm: arm_summary(grpo, records, runs[name]["exgrpo"] if arm in regime_ablations else None)
                for arm, records in runs[name].items()
            },
            "equal_rollouts": _equal_rollouts(runs[name]),
        }
    targets = evaluate_targets(regimes)
    print_report(regimes, targets)

    arms_run = list(dict.fromkeys(arm for regime_runs in runs.values() for arm in regime_runs))
    settings = run_settings(args, seeds, spec, arms_run)
    settings["learning_rates"] = {"choices": learning_rates, "ablations": "ExGRPO's chosen rate"}
    settings["ablation_seeds"] = ablation_seeds
    report = report_header("experience", args.smoke, settings, command_line(__file__, argv))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "regimes": regimes,
            "targets": targets,
            "weak_model": None
            if weak is None
            else {"steps": args.weak_model_steps, "pretraining": json.loads((weak / "pretraining.json").read_text())},
            "runs": {name: {arm: [run_summary(r) for r in rs] for arm, rs in r.items()} for name, r in runs.items()},
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "experience.json", report)
    plot(regimes, runs, output_dir / "experience.png")
    print(f"\nwrote {output_dir / 'experience.json'} and experience.png")
    return report


def _equal_rollouts(runs: dict) -> list[dict]:
    """Each arm's mean accuracy at every evaluation point (all arms generate the same rollouts per step)."""
    means = {arm: mean_curve([r["curve"] for r in records], "accuracy") for arm, records in runs.items()}
    grpo = [r["curve"] for r in runs["grpo"]]
    steps, rollouts = mean_curve(grpo, "step"), mean_curve(grpo, "rollouts_generated")
    return [
        {"step": int(step), "rollouts_generated": x, **{arm: values[i] for arm, values in means.items()}}
        for i, (step, x) in enumerate(zip(steps, rollouts))
    ]


if __name__ == "__main__":
    main(sys.argv[1:])
