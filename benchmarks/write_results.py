"""Write the README's results section from the benchmarks' JSON outputs.

    python benchmarks/write_results.py                  # benchmarks/results/*.json -> README.md
    python benchmarks/write_results.py --print          # print the section instead of writing it

Reads, from `--results-dir`, whichever of these exist (a missing one is listed as not run, and skipped):
`overhead*.json` (benchmark 1, `bench_overhead.py`; several files, e.g. a CPU and a GPU run, each get a table),
`distribution_matching.json` (and `distribution_matching_<N>steps.json`, longer runs), `experience.json`,
`target_distribution.json`, `matching_toy_*.json`, `pass_at_k.json` and `replay.json` (benchmarks 2 to 7). It renders a
markdown "Results" section that names the machine and the date of each measurement and links the plots, and
replaces what lies between the `<!-- results:start -->` and `<!-- results:end -->` lines of `--readme`; nothing
outside them changes. The figures are copied from the JSON files as they are, misses included; a smoke run is
labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from learning_rates import LEARNING_RATES


REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
# Names of the trainers of benchmark 1 and of the arms; a report's own labels (settings["arms"], written by benchmarks
# 2 to 4) win.
LABELS = {
    "grpo": "GRPO",
    "grpo_kl": "GRPO + KL",
    "flowrl": "FlowRL official",
    "flowrl_matching": "FlowRL matching",
    "flowrl_matching_head": "FlowRL matching, log Z head",
    "flowrl_matching_b5": "FlowRL matching (beta 5)",
    "flowrl_matching_replay": "FlowRL matching + replay 0.5",
    "exgrpo": "ExGRPO",
    "exgrpo_no_replay": "ExGRPO with replay_ratio 0",
}
FILES = {
    "distribution_matching": "distribution_matching.json",
    "experience": "experience.json",
    "target_distribution": "target_distribution.json",
}
COMMANDS = {
    "overhead": "python benchmarks/bench_overhead.py",
    "distribution_matching": "python benchmarks/bench_distribution_matching.py",
    "experience": "python benchmarks/bench_experience.py",
    "target_distribution": "python benchmarks/bench_target_distribution.py",
    "matching_toy": "python benchmarks/bench_matching_toy.py",
    "pass_at_k": "python benchmarks/bench_pass_at_k.py",
    "replay": "python benchmarks/bench_replay.py",
}
# The benchmarks whose options come from `run_options.add_run_arguments` (defaults: 300 steps, evaluation every 25).
SHARED_OPTIONS = ("distribution_matching", "experience", "replay", "target_distribution")
DEFAULT_LEARNING_RATES = [float(lr) for lr in LEARNING_RATES.split(",")]


def _label(name: str, report: dict | None = None) -> str:
    arms = (report or {}).get("settings", {}).get("arms", {})
    return arms.get(name, {}).get("label") or LABELS.get(name, name)


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _per_seed(values, fmt="{:.2f}", scale=1.0) -> str:
    return ", ".join(fmt.format(scale * v) for v in values)


def _command(report: dict, name: str) -> str:
    """How the report was made: the command it recorded, or, for a report written before benchmarks recorded it, the
    script with the flags its settings show to differ from the defaults of `run_options.py` (steps, evaluation,
    seeds, torch threads, learning rates, benchmark 3's ablation seeds; not `--arms`, whose default is each script's)."""
    if report.get("command") or name not in SHARED_OPTIONS:
        return report.get("command") or COMMANDS[name]
    settings = report.get("settings", {})
    flags = []
    if settings.get("steps", 300) != 300:
        flags.append(f"--steps {settings['steps']}")
    if settings.get("eval", {}).get("every", 25) != 25:
        flags.append(f"--eval-every {settings['eval']['every']}")
    if settings.get("seeds", [0, 1, 2]) != [0, 1, 2]:
        flags.append(f"--seeds {','.join(map(str, settings['seeds']))}")
    if report.get("torch_threads", 1) != 1:
        flags.append(f"--num-threads {report['torch_threads']}")
    rates = settings.get("learning_rates")
    if isinstance(rates, dict) and rates.get("choices", DEFAULT_LEARNING_RATES) != DEFAULT_LEARNING_RATES:
        flags.append(f"--learning-rates {','.join(f'{lr:g}' for lr in rates['choices'])}")
    ablation_seeds = settings.get("ablation_seeds", settings.get("seeds"))
    ablations_ran = any(map(_ablation_seeds, report.get("regimes", {}).values()))
    if name == "experience" and ablation_seeds != settings.get("seeds") and ablations_ran:
        flags.append(f"--ablation-seeds {','.join(map(str, ablation_seeds))}")
    return " ".join([COMMANDS[name], *flags])


def _provenance(report: dict, name: str) -> list[str]:
    smoke = " **Smoke run (a check that the script runs), not a measurement.**" if report.get("smoke") else ""
    threads = f", {report['torch_threads']} torch thread(s) per process" if report.get("torch_threads") else ""
    device = report.get("device", "cpu")
    return [
        f"Measured on {report.get('machine', 'an unrecorded machine')} ({device}{threads}) on "
        f"{report.get('date', 'an unrecorded date')} with `{_command(report, name)}`.{smoke}"
    ]


def _image(results_dir: Path, readme_dir: Path, stem: str, alt: str) -> list[str]:
    png = results_dir / f"{stem}.png"
    if not png.is_file():
        return []
    return ["", f"![{alt}]({Path(os.path.relpath(png, readme_dir)).as_posix()})"]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _compute_time(report: dict) -> str:
    """Training and evaluation time of the runs a benchmark used (a run reused from the cache counts once where it
    was measured, so several benchmarks may list the same run)."""
    runs = [r for records in report.get("runs", {}).values() for r in records]
    if not runs or "train_seconds" not in runs[0]:
        return ""
    train = sum(r["train_seconds"] for r in runs)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in runs)
    per_step = {
        name: sum(r["train_seconds"] for r in records) / sum(r["steps"] for r in records)
        for name, records in report["runs"].items()
    }
    steps = ", ".join(f"{_label(n, report)} {v:.2f} s" for n, v in per_step.items())
    return (
        f"Runs used: {len(runs)} (a run shared with another benchmark is counted in each), {_minutes(train)} of "
        f"training and {_minutes(evaluation)} of held-out evaluation "
        f"(mean step: {steps})."
    )


# -- benchmark 1 ---------------------------------------------------------------------------------------------------


def render_overhead(report: dict, results_dir: Path, readme_dir: Path, stem: str) -> list[str]:
    device = report.get("device", "cpu")
    lines = [f"### 1. Overhead: step time and peak memory relative to GRPO ({device})", ""]
    lines += _provenance(report, "overhead")
    settings = report.get("settings", {})
    if settings:
        lines[-1] += " Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None) + "."
    summary = report.get("summary", {})
    if summary:
        lines += ["", "| trainer | median step time (s) | spread (s) | peak memory (MiB) |", "|---|---:|---:|---:|"]
        for name, s in summary.items():
            lines.append(
                f"| {_label(name)} | {s.get('step_time_s', float('nan')):.3f} | "
                f"{s.get('step_time_spread_s', float('nan')):.3f} | {s.get('peak_memory_mb', float('nan')):.0f} |"
            )
    ratios = report.get("step_time_ratios", {})
    if ratios:
        lines += ["", "Step-time ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + "."]
    memory = report.get("peak_memory_ratios", {})
    if memory:
        lines += ["Peak-memory ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in memory.items()) + "."]
    for key, t in report.get("targets", {}).items():
        lines.append(f"- Target {key} <= {t['target']:.2f}: {t['ratio']:.3f}, {_verdict(t['met'])}.")
    return lines + _image(results_dir, readme_dir, stem, "overhead")


# -- benchmark 2 ---------------------------------------------------------------------------------------------------

DM_METRICS = (
    ("accuracy", "held-out accuracy (avg@k, %)", 100.0, "{:.1f}"),
    ("pass_at_k", "pass@k (%)", 100.0, "{:.1f}"),
    ("distinct_correct_paths", "distinct correct paths per problem", 1.0, "{:.2f}"),
    ("distinct_correct_paths_solved", "distinct correct paths per solved problem", 1.0, "{:.2f}"),
    ("correct_path_entropy", "entropy over correct paths (nats)", 1.0, "{:.3f}"),
    ("valid_path_rate", "samples writing a valid path (%)", 100.0, "{:.1f}"),
    ("tv", "total variation to the target", 1.0, "{:.3f}"),
    ("kl", "KL(policy ‖ target) (nats)", 1.0, "{:.3f}"),
    ("kl_reverse", "KL(target ‖ policy) (nats)", 1.0, "{:.3f}"),
)


def _settings_line(report: dict) -> str:
    s = report["settings"]
    e = s["eval"]
    rates = s.get("learning_rates")  # benchmark 2's protocol: {"choices": [...], "chosen": {arm: rate}}
    chosen = rates.get("chosen") if isinstance(rates, dict) else None
    settings = "the recipes' embedded settings"
    if chosen:
        per_arm = ", ".join(f"{_label(name, report)} {lr:g}" for name, lr in chosen.items())
        settings += f" except the learning rate, chosen per arm on a validation split ({per_arm})"
    elif isinstance(rates, dict) and len(rates.get("choices", ())) > 1:  # benchmark 3: a choice in each regime
        settings += " except the learning rate, chosen per arm and regime on a validation split (below)"
    elif isinstance(rates, dict) and rates.get("choices"):
        settings += f" except the learning rate, {rates['choices'][0]:g} for every arm"
    return (
        f"Seeds {', '.join(map(str, s['seeds']))}; {s['steps']} steps per run with {settings}; "
        f"held-out evaluation every {e['every']} steps on the same {e['num_problems']} problems x "
        f"{e['num_samples']} samples at temperature {s.get('eval_temperature', 1.0)}."
    )


def _arms_line(report: dict) -> str:
    """What each arm is: its trainer's embedded recipe plus its overrides."""
    arms = report.get("settings", {}).get("arms", {})
    if not arms:
        return ""
    parts = [
        f"{a.get('label', LABELS.get(name, name))}: "
        + (f"`{' '.join(a['overrides'])}`" if a["overrides"] else "the recipe's settings")
        for name, a in arms.items()
    ]
    return "Arms (the trainer's embedded recipe plus these flags): " + "; ".join(parts) + "."


def _table(header: str, arms: list[str], rows: list[tuple[str, list[str]]], report: dict, first=()) -> list[str]:
    """A markdown table with one column per arm (after the optional `first` columns)."""
    columns = [*first, *(_label(name, report) for name in arms)]
    lines = ["| " + " | ".join([header, *columns]) + " |", "|---|" + "---:|" * len(columns)]
    return lines + ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]


def _mean_and_seeds(s: dict, fmt: str, scale: float = 1.0) -> str:
    return f"{fmt.format(scale * s['mean'])} ({_per_seed(s['per_seed'], fmt, scale)})"


CHECKS = {  # name: (what, format of its values)
    "paths_ratio": ("distinct correct paths, ratio to {baseline}'s", "{:.2f}x"),
    "accuracy_gap": ("accuracy minus {baseline}'s", "{:+.1f} points"),
    "tv": ("total variation to the target", "{:.3f}"),
}


def _check_line(name: str, check: dict, baseline: str) -> str:
    what, fmt = CHECKS[name]
    value = "undefined (the baseline has none)" if check["value"] is None else fmt.format(check["value"])
    seeds = ", ".join("-" if v is None else fmt.format(v) for v in check["per_seed"])
    bound = "at least" if check["comparison"] == ">=" else "at most"
    verdict = _verdict(check["met"])
    if check["margin"] is not None:
        margin = fmt.format(abs(check["margin"])).lstrip("+")
        verdict += f" (margin {margin})" if check["met"] else f", short by {margin}"
    return (
        f"- {what[0].upper()}{what[1:].format(baseline=baseline)}: {value} (per seed {seeds}); target {bound} "
        f"{fmt.format(check['threshold'])}: {verdict}."
    )


def _evaluation_lines(evaluation: dict, report: dict) -> list[str]:
    arm, baseline = _label(evaluation["arm"], report), _label(evaluation["baseline"], report)
    intro = {
        "target": f"Targets ({evaluation['targets']}), {arm} against {baseline}: {_verdict(evaluation['met'])}.",
        "information": f"Against the targets of {evaluation['targets']}, {arm} against {baseline} (information, not a "
        "target): "
        f"{'all met' if evaluation['met'] else 'not all met'}.",
        "superseded": f"The former target of {evaluation['targets']}, {arm} against {baseline}: "
        f"{'met' if evaluation['met'] else 'missed'}.",
    }[evaluation["role"]]
    return ["", intro] + [_check_line(n, c, baseline) for n, c in evaluation["checks"].items()]


def _learning_rate_lines(report: dict, choice: dict | None = None) -> list[str]:
    """The learning-rate choice (benchmark 2's, or `choice`: one regime's of benchmark 3): validation figures of each
    arm's runs, one column per rate."""
    if choice is None:
        choice = report.get("learning_rate_choice")
    if not choice:
        return []
    rates = list(next(iter(choice.values()))["validation"])
    seed = report["settings"]["seeds"][0]
    e = report["settings"]["eval"]
    lines = [
        "",
        f"Learning rates, chosen per arm on a validation split ({e.get('validation_problems', 0)} train-split problems "
        f"outside the training set x {e['num_samples']} samples, never the held-out problems): one run per rate with "
        f"seed {seed} and the same {report['settings']['steps']} steps for every arm, the best validation accuracy "
        "wins, and the other seeds run at it. Validation accuracy (%) and distinct correct paths at the end of each "
        "run:",
        "",
        "| arm | initial | " + " | ".join(f"lr {r}" for r in rates) + " | chosen |",
        "|---|---:|" + "---:|" * len(rates) + "---:|",
    ]
    for name, c in choice.items():
        start = c["validation_initial"]
        cells = [f"{100 * start['accuracy']:.1f} / {start['distinct_correct_paths']:.2f}"]
        cells += [
            f"{100 * c['validation'][r]['accuracy']:.1f} / {c['validation'][r]['distinct_correct_paths']:.2f}"
            for r in rates
        ]
        lines.append(f"| {_label(name, report)} | " + " | ".join([*cells, f"{c['chosen']:g}"]) + " |")
    others = [
        seconds
        for c in choice.values()
        for rate, seconds in c.get("seconds", {}).items()
        if float(rate) != c["chosen"]
    ]
    if others:
        train, evaluation = sum(s["train"] for s in others), sum(s["eval"] for s in others)
        lines += [
            "",
            f"The rates not chosen took {len(others)} more runs ({_minutes(train)} of training, "
            f"{_minutes(evaluation)} of evaluation) than the runs counted above.",
        ]
    return lines


def render_distribution_matching(report: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    lines = ["### 2. Distribution matching: GRPO, GRPO + KL and FlowRL's two objectives on the embedded task", ""]
    lines += _provenance(report, "distribution_matching")
    lines[-1] += " " + _settings_line(report) + " " + _compute_time(report)
    arms_line = _arms_line(report)
    if arms_line:
        lines += ["", arms_line]
    final, initial = report["final"], report["initial"]
    arms = list(final)
    rows = []
    for key, label, scale, fmt in DM_METRICS:
        if key not in initial and all(key not in final[name] for name in arms):
            continue
        start = initial.get(key)
        cells = [fmt.format(scale * start) if start is not None else "-"]
        cells += [_mean_and_seeds(final[name][key], fmt, scale) if key in final[name] else "-" for name in arms]
        rows.append((label, cells))
    lines += _learning_rate_lines(report)
    lines += [""] + _table("at the end of training, mean (per seed)", arms, rows, report, first=("initial",))
    for evaluation in report.get("evaluations", []):
        lines += _evaluation_lines(evaluation, report)
    lines += _image(results_dir, readme_dir, "distribution_matching", "distribution matching curves")
    if (results_dir / "distribution_matching_tradeoff.png").is_file():
        lines += _image(results_dir, readme_dir, "distribution_matching_tradeoff", "accuracy against distinct paths")
    for path in sorted(results_dir.glob("distribution_matching_*steps.json")):
        longer = json.loads(path.read_text())
        if longer["settings"]["steps"] > report["settings"]["steps"]:  # a shorter trial run is not a result
            lines += _longer_run_lines(longer, report, results_dir, readme_dir, path.stem)
    return lines


LONGER_RUN_ROWS = (
    ("held-out accuracy (%)", lambda p: 100 * p["accuracy"], "{:.1f}"),
    ("distinct correct paths", lambda p: p["distinct_correct_paths"], "{:.2f}"),
    ("total variation to the target", lambda p: p["target"]["tv"], "{:.3f}"),
)


def _longer_run_lines(longer: dict, report: dict, results_dir: Path, readme_dir: Path, stem: str) -> list[str]:
    """Where the arms of a longer run of benchmark 2 are at its end and at the recipes' step count."""
    steps, short = longer["settings"]["steps"], report["settings"]["steps"]
    arms = list(longer["runs"])
    chosen = report["settings"].get("learning_rates", {}).get("chosen", {})
    rates = longer["settings"].get("learning_rates", {}).get("chosen", {})
    same = [a for a in arms if a in chosen and rates.get(a) == chosen[a]]
    threads = f", {longer['torch_threads']} torch thread(s) per process" if longer.get("torch_threads") else ""
    text = (
        f"Measured on {longer.get('date')}, {longer.get('machine')} ({longer.get('device', 'cpu')}{threads}), with "
        f"`{_command(longer, 'distribution_matching')}` (seeds {', '.join(map(str, longer['settings']['seeds']))})."
    )
    if same:
        text += (
            f" {', '.join(_label(a, report) for a in same)}: at the learning rate{'s' * (len(same) > 1)} the protocol"
            f" chose above, run for {steps} steps; the rate is constant, so the first {short} steps of these runs are"
            f" the runs above, and their step-{short} figures those of the table above."
        )
    for a in arms:
        if a in same:
            continue
        if a not in rates:
            text += f" {_label(a, longer)}: its learning rate was not recorded."
        elif a in chosen:
            text += (
                f" {_label(a, longer)}: at {rates[a]:g}, not the {chosen[a]:g} the protocol chose at {short} steps; its"
                f" step-{short} figures are read from these runs."
            )
        else:
            text += (
                f" {_label(a, longer)}, not an arm of the protocol above, at {rates[a]:g} without a choice of its own;"
                f" its step-{short} figures are read from these runs."
            )
    text += " " + _compute_time(longer)
    lines = ["", f"#### At {steps} steps", "", text.rstrip(), ""]
    rows = []
    for label, value, fmt in LONGER_RUN_ROWS:
        cells = []
        for name in arms:
            at = {point["step"]: point for point in longer["runs"][name][0]["curve"]}
            if short not in at:
                cells.append("-")
                continue
            means = [
                sum(value({p["step"]: p for p in r["curve"]}[step]) for r in longer["runs"][name])
                / len(longer["runs"][name])
                for step in (short, steps)
            ]
            seeds = [value(r["curve"][-1]) for r in longer["runs"][name]]
            cells.append(f"{fmt.format(means[0])} -> {fmt.format(means[1])} ({_per_seed(seeds, fmt)})")
        rows.append((label, cells))
    lines += _table(f"mean at step {short} -> {steps} (per seed at {steps})", arms, rows, report)
    for evaluation in longer.get("evaluations", []):
        if evaluation["role"] in ("target", "information"):
            lines += _evaluation_lines(evaluation, longer)
    lines += _image(results_dir, readme_dir, stem, f"the arms over {steps} steps")
    lines += _image(results_dir, readme_dir, f"{stem}_tradeoff", f"accuracy against distinct paths at {steps} steps")
    return lines


# -- benchmark 3 ---------------------------------------------------------------------------------------------------


def _ratio(value) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


# The paper's in-distribution average (Qwen2.5-Math-7B) for each arm of benchmark 3, and what the arm is there.
PAPER_EXGRPO = {
    "grpo": "45.3 (on-policy)",
    "exgrpo": "48.3",
    "exgrpo_no_replay": "45.3 (on-policy)",
    "exgrpo_no_shaping": "41.2",
    "exgrpo_no_is": "47.1",
    "exgrpo_uniform_questions": "46.7",
    "exgrpo_random_trajectory": "46.3",
    "exgrpo_requeue": "not in the paper (a departure)",
}


def _experience_time(report: dict) -> str:
    runs = [r for arms in report.get("runs", {}).values() for records in arms.values() for r in records]
    if not runs:
        return ""
    train = sum(r["train_seconds"] for r in runs)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in runs)
    return (
        f"Runs used: {len(runs)} (a run shared with another benchmark is counted in each), {_minutes(train)} of "
        f"training and {_minutes(evaluation)} of held-out evaluation."
    )


def _ablation_seeds(regime: dict) -> list[int]:
    """The seeds the ablations of a regime ran on ([] without ablations)."""
    return next((s.get("seeds", []) for s in regime["arms"].values() if "gap_to_exgrpo_points" in s), [])


def render_experience(report: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    lines = ["### 3. Experience: ExGRPO vs GRPO where fresh questions are scarce and where they are plentiful", ""]
    lines += _provenance(report, "experience")
    lines[-1] += " " + _settings_line(report) + " " + _experience_time(report)
    weak = report.get("weak_model")
    if weak:
        held_out = weak["pretraining"].get("held_out", {})
        lines += [
            "",
            f"The scarce regime starts from the arithmetic model pre-trained for {weak['steps']} steps instead of 800 "
            f"(held-out accuracy {100 * held_out.get('accuracy', float('nan')):.1f}% at the end of pre-training, "
            "against the shipped model's 41.2%), built by the benchmark with `scripts/pretrain_tiny_model.py`.",
        ]
    for name, regime in report["regimes"].items():
        grpo = regime["arms"]["grpo"]
        lines += [
            "",
            f"**{name}**: {regime['description']}. GRPO ends at {100 * grpo['final_accuracy']['mean']:.1f}% "
            f"({_per_seed(grpo['final_accuracy']['per_seed'], '{:.1f}', 100)}) after "
            f"{grpo['to_reach_grpo_final']['grpo_rollouts']:.0f} rollouts, having trained on "
            f"{grpo['distinct_questions']['mean']:.0f} distinct questions.",
        ]
        lines += _learning_rate_lines(report, regime.get("learning_rate_choice"))
        if "learning_rate_choice" in regime and _ablation_seeds(regime):
            rate = regime["learning_rate_choice"]["exgrpo"]["chosen"]
            lines += [
                "",
                f"The ablations run at ExGRPO's chosen rate ({rate:g}): each removes one part and keeps the rest.",
            ]
        lines += [
            "",
            "| arm | final accuracy, % (per seed) | minus GRPO, points (same seeds) | rollouts to reach GRPO's final, "
            "x GRPO's (per seed; same seeds) | minus ExGRPO, points (ablations, same seeds) | distinct questions trained | most replays "
            "of one question | replay from step | paper |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for arm, s in regime["arms"].items():
            most = [m for m in s["max_replays_per_question"] if m is not None]
            started = [str(x) if x is not None else "-" for x in s["replay_started_at_step"]]
            lines.append(
                f"| {_label(arm, report)} | {100 * s['final_accuracy']['mean']:.1f} "
                f"({_per_seed(s['final_accuracy']['per_seed'], '{:.1f}', 100)}) | "
                + ("-" if arm == "grpo" else f"{s['gap_points']['mean']:+.1f}")
                + f" | {_ratio(s['to_reach_grpo_final']['ratio'])} "
                f"({', '.join(_ratio(r) for r in s['to_reach_per_seed'])}) | "
                + (f"{s['gap_to_exgrpo_points']['mean']:+.1f}" if "gap_to_exgrpo_points" in s else "-")
                + f" | {s['distinct_questions']['mean']:.0f} | "
                + (", ".join(map(str, most)) if most and any(most) else "-")
                + f" | {', '.join(started) if most and any(most) else '-'} | {PAPER_EXGRPO.get(arm, '')} |"
            )
        points = [p for p in regime["equal_rollouts"] if p["step"] % 50 == 0 or p is regime["equal_rollouts"][-1]]
        arms = list(regime["arms"])
        lines += [
            "",
            "Held-out accuracy (%) at equal rollouts, mean over each arm's seeds (the ablations': "
            + ", ".join(str(seed) for seed in _ablation_seeds(regime))
            + "):"
            if _ablation_seeds(regime)
            else "Held-out accuracy (%) at equal rollouts, mean over seeds:",
            "",
            "| step | rollouts | " + " | ".join(_label(a, report) for a in arms) + " |",
            "|---:|---:|" + "---:|" * len(arms),
        ]
        for p in points:
            lines.append(
                f"| {p['step']} | {p['rollouts_generated']:.0f} | "
                + " | ".join(f"{100 * p[a]:.1f}" for a in arms)
                + " |"
            )
    lines += ["", "Targets (issue 10):"]
    for key, check in report.get("targets", {}).items():
        if key == "scarce_rollouts":
            value = _ratio(check["value"])
            per_seed = ", ".join(_ratio(v) for v in check["per_seed"])
        else:
            value = f"{check['value']:+.1f} points"
            per_seed = ", ".join(f"{v:+.1f}" for v in check["per_seed"])
        arm = f" ({_label(check['arm'], report)})" if "arm" in check else ""
        regime = key.split("_")[0]  # scarce_rollouts, scarce_gain, plentiful_best
        lines.append(
            f"- {regime}: {check['description']}: {value}{arm} (per seed {per_seed}), {_verdict(check['met'])}."
        )
    return lines + _image(results_dir, readme_dir, "experience", "accuracy against rollouts in both regimes")


# -- benchmark 4 ---------------------------------------------------------------------------------------------------


TD_ROWS = (
    ("tv", "total variation to the target"),
    ("kl", "KL(policy ‖ target) (nats)"),
    ("kl_reverse", "KL(target ‖ policy) (nats)"),
    ("policy_mass", "probability mass on valid paths"),
    ("policy_entropy", "entropy over the valid paths (nats)"),
    ("policy_top", "largest probability of a path (renormalised)"),
    ("policy_on_reference_top", "probability of the target's likeliest path"),
)


def render_target_distribution(report: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    lines = ["### 4. Distance to FlowRL's target distribution over the correct paths", ""]
    lines += _provenance(report, "target_distribution")
    s = report["settings"]
    lines[-1] += (
        f" The final policies of the runs of benchmark 2 (seeds {', '.join(map(str, s['seeds']))}, {s['steps']} "
        f"steps{', each arm at its chosen learning rate' if isinstance(s.get('learning_rates'), dict) else ''}) on {s['problems']} held-out problems, every valid path enumerated ({report['paths_per_problem']:.1f} "
        "per problem on average); the target among them is the reference model renormalised. The matching "
        "objective's fixed point is that target; the official objective's is π_ref · exp(β · |y| · A), not it."
    )
    summary = report["summary"]
    arms = list(summary)
    rows = [(label, [_mean_and_seeds(summary[name][key], "{:.3f}") for name in arms]) for key, label in TD_ROWS]
    lines += [""] + _table("final policy, mean (per seed)", arms, rows, report)
    reference = report.get("reference") or {
        key: summary[arms[0]][f"reference_{key}"]["mean"] for key in ("mass", "entropy", "top")
    }
    collapsed, uniform = report["anchors"]["collapsed"], report["anchors"]["uniform"]
    lines += [
        "",
        f"The reference (the target) puts {reference['mass']:.3f} of its mass on valid paths, with entropy "
        f"{reference['entropy']:.3f} nats over them; its likeliest path has {reference['top']:.3f} of the "
        "renormalised mass. For scale: a policy collapsed onto the reference's likeliest path would be at total "
        f"variation {collapsed['tv']:.3f} and KL {collapsed['kl']:.3f} nats; the uniform distribution over the paths "
        f"at {uniform['tv']:.3f} and {uniform['kl']:.3f} nats.",
    ]
    for t in report.get("tv_targets", []):
        role = "target" if t["role"] == "target" else "information, not a target"
        lines += ["", f"{t['targets'].capitalize()}'s bound on these problems, {_label(t['arm'], report)} ({role}):"]
        lines.append(_check_line("tv", t["check"], ""))
    return lines + _image(results_dir, readme_dir, "target_distribution", "distance to the target distribution")


# -- benchmark 5 ---------------------------------------------------------------------------------------------------


def _toy_table(report: dict) -> list[str]:
    """Rows: the arms; columns: each toy variant and beta, with the arm's best learning rate (lowest mean TV)."""
    rows: dict[tuple, list] = {}
    for run in report["runs"]:
        rows.setdefault((run["arm_name"], run["lengths"], run["beta"], run["lr"]), []).append(run)
    arms = list(dict.fromkeys(key[0] for key in rows))
    panels = list(dict.fromkeys(key[1:3] for key in rows))
    header = ["arm", *(f"{lengths} lengths, beta {beta:g}" for lengths, beta in panels)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(panels)]
    for arm in arms:
        cells = []
        for lengths, beta in panels:
            by_lr = {k[3]: v for k, v in rows.items() if k[:3] == (arm, lengths, beta)}
            if not by_lr:
                cells.append("-")
                continue
            lr, runs = min(by_lr.items(), key=lambda item: sum(r["tv"] for r in item[1]) / len(item[1]))
            tvs = [r["tv"] for r in runs]
            clipped = sum(r["clipped_fraction"] for r in runs) / len(runs)
            cells.append(
                f"{sum(tvs) / len(tvs):.3f} ({_per_seed(tvs, '{:.3f}')}) at lr {lr:g}, {100 * clipped:.0f}% clipped"
            )
        lines.append("| " + " | ".join([arm, *cells]) + " |")
    return lines


def render_matching_toy(reports: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    lines = ['### 5. The matching preset on an enumerable toy: why "length" matched slowly, and "sum"', ""]
    first = next(iter(reports.values()))
    lines += _provenance(first, "matching_toy")
    lines[-1] += (
        " A tiny transformer pre-trained as the reference writes one of 16 valid answers (9 tokens each, or 3 to 12) "
        "with uneven probabilities; the policy is trained with the project's trajectory-balance loss (group log Z, "
        "raw 0/1 reward), 4 groups x 16 samples per step, AdamW, `max_grad_norm` 1 unless the arm says otherwise. "
        'Total variation to p* is exact (the 16 answers and "anything else"). Each cell: the mean over 3 seeds '
        "(per seed) at the arm's best learning rate of those run, and the share of steps whose gradient was clipped."
    )
    for name, report in reports.items():
        s = report["settings"]
        lrs = ", ".join(f"{lr:g}" for lr in s["lrs"])
        lines += [
            "",
            f"`{name}.json`: {s['steps']} steps, {s.get('schedule', 'linear')} learning rate, rates {lrs}:",
            "",
        ]
        lines += _toy_table(report)
    long_path = results_dir / "matching_toy_long.json"
    if long_path.is_file():
        long = json.loads(long_path.read_text())
        lines += [
            "",
            "Gradient norm of one step before clipping, at long completions (`--long`: a tiny model, hidden size 64, "
            "a policy perturbed from its reference, 4 random completions, rewards 1, 0, 1, 0, beta 15):",
            "",
            '| completion tokens | "sum" | "length" | largest absolute residual, "sum" |',
            "|---:|---:|---:|---:|",
        ]
        for row in long["rows"]:
            lines.append(
                f"| {row['tokens']} | {row['sum']['grad_norm']:.3g} | {row['length']['grad_norm']:.3g} | "
                f"{row['sum']['residual_abs_max']:.3g} |"
            )
    for name in reports:
        lines += _image(results_dir, readme_dir, name, f"toy: {name}")
    return lines


# -- benchmark 6 ---------------------------------------------------------------------------------------------------


def render_pass_at_k(report: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    s = report["settings"]
    lines = ["### 6. pass@k on the programming task: GRPO and FlowRL's two objectives", ""]
    # The runs are processes of their own, each on one torch thread (said below), not the process that wrote the JSON.
    lines += _provenance({k: v for k, v in report.items() if k != "torch_threads"}, "pass_at_k")
    runs = [r for records in report["runs"].values() for r in records]
    lines[-1] += (
        f" Seeds {', '.join(map(str, s['seeds']))}; each arm trained by its code recipe ({s['steps']} steps, the "
        f"recipes' embedded settings and learning rate, {s['jobs']} runs at a time, one torch thread each), then "
        f"{s['samples']} samples per held-out problem ({s['problems']}) at temperature 1.0. "
        f"{len(runs)} runs: {_minutes(sum(r['train_seconds'] for r in runs))} of training, "
        f"{_minutes(sum(r['eval_seconds'] for r in runs))} of evaluation."
    )
    arms_line = _arms_line(report)
    if arms_line:
        lines += ["", arms_line]
    arms, initial, summary = list(report["summary"]), report["initial"], report["summary"]
    samples = len(initial["pass_at_k"])
    rows = []
    for k in (k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples):
        cells = [f"{100 * initial['pass_at_k'][k - 1]:.1f}"]
        cells += [_mean_and_seeds(summary[a]["pass_at_k"][k - 1], "{:.1f}", 100.0) for a in arms]
        rows.append((f"pass@{k} (%)", cells))
    rows.append(
        (
            "avg@k (%)",
            [f"{100 * initial['accuracy']:.1f}"]
            + [_mean_and_seeds(summary[a]["accuracy"], "{:.1f}", 100.0) for a in arms],
        )
    )
    for key, label in (
        ("distinct_passing_programs", "distinct passing programs per problem"),
        ("distinct_passing_programs_solved", "... per solved problem"),
    ):
        start = initial[key]
        cells = ["-" if start is None else f"{start:.2f}"]
        cells += ["-" if summary[a][key]["mean"] is None else _mean_and_seeds(summary[a][key], "{:.2f}") for a in arms]
        rows.append((label, cells))
    lines += [""] + _table("held-out, mean (per seed)", arms, rows, report, first=("initial",))
    for evaluation in report.get("evaluations", []):
        arm = _label(evaluation["arm"], report)
        role = "Targets (issue 18)" if evaluation["role"] == "target" else "The same thresholds (information)"
        lines += [
            "",
            f"{role}, {arm} against {_label(evaluation['baseline'], report)}: {_verdict(evaluation['met'])}.",
        ]
        for name, c in evaluation["checks"].items():
            state = f"margin {c['margin']:.1f}" if c["met"] else f"short by {-c['margin']:.1f}"
            lines.append(
                f"- {name}: {c['value']:+.1f}; target at least {c['threshold']:+.1f}: {_verdict(c['met'])} ({state})."
            )
    lines += _image(results_dir, readme_dir, "pass_at_k", "pass@k curves")
    return lines


# -- benchmark 7 ---------------------------------------------------------------------------------------------------

REPLAY_ROWS = (
    ("held-out accuracy (%)", "accuracy", 100.0, "{:.1f}"),
    ("distinct correct paths per problem", "distinct_correct_paths", 1.0, "{:.2f}"),
    ("total variation to the target", "tv", 1.0, "{:.3f}"),
    ("rollouts generated", "rollouts_generated", 1.0, "{:.0f}"),
    ("training wall time (s)", "train_seconds", 1.0, "{:.0f}"),
    ("seconds per step", "seconds_per_step", 1.0, "{:.2f}"),
)
REPLAY_CHECKS = {
    "rollouts_ratio": "rollouts generated to reach the matching arm's final accuracy, ratio to it",
    "paths": "distinct correct paths at the end",
    "tv": "total variation to the target at the end",
    "wall_time_ratio": "training wall time to the matching arm's final accuracy, ratio to it",
    "step_time_ratio": "seconds per step, ratio to the matching arm's",
}


def render_replay(report: dict, results_dir: Path, readme_dir: Path) -> list[str]:
    lines = ["### 7. Replay of past rollouts for FlowRL's matching objective", ""]
    lines += _provenance(report, "replay")
    lines[-1] += f" {_settings_line(report)} Learning rate {report['settings']['learning_rate']:g} for both arms."
    lines[-1] += " " + _compute_time(report)
    arms_line = _arms_line(report)
    if arms_line:
        lines += ["", arms_line]
    summary, grpo = report["summary"], report.get("grpo")
    arms = list(summary)
    rows = []
    for label, key, scale, fmt in REPLAY_ROWS:
        cells = [_mean_and_seeds(summary[a][key], fmt, scale) for a in arms]
        if grpo:
            cells.append(_mean_and_seeds(grpo[key], fmt, scale) if key in grpo else "-")
        rows.append((label, cells))
    table = _table("at the end of training, mean (per seed)", arms, rows, report)
    if grpo:  # a reference column from benchmark 2's runs, not an arm of this benchmark
        table[0] = table[0][:-1] + f"| GRPO ({grpo['source']}) |"
        table[1] += "---:|"
    lines += [""] + table
    if report.get("checks"):
        lines.append("")
    for name, c in report.get("checks", {}).items():
        value = "not reached" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(
            f"- {REPLAY_CHECKS[name]}: {value}; target {c['comparison']} {c['threshold']:.3f}: {_verdict(c['met'])}."
        )
    lines += _image(
        results_dir, readme_dir, "replay", "accuracy against rollouts and wall time, with and without replay"
    )
    return lines


# -- assembly ------------------------------------------------------------------------------------------------------


def render(results_dir: Path, readme_dir: Path) -> str:
    """The markdown section (without the markers) from the JSON files found in `results_dir`."""
    sections, missing, machines = [], [], set()
    overheads = sorted(results_dir.glob("overhead*.json"))
    for path in overheads:
        report = json.loads(path.read_text())
        machines.add((report.get("machine"), report.get("device", "cpu")))
        sections.append(render_overhead(report, results_dir, readme_dir, path.stem))
    if not overheads:
        missing.append("1 (overhead)")
    renderers = {
        "distribution_matching": render_distribution_matching,
        "experience": render_experience,
        "target_distribution": render_target_distribution,
    }
    for number, (name, renderer) in enumerate(renderers.items(), start=2):
        path = results_dir / FILES[name]
        if not path.is_file():
            missing.append(f"{number} ({name.replace('_', ' ')})")
            continue
        report = json.loads(path.read_text())
        machines.add((report.get("machine"), report.get("device", "cpu")))
        sections.append(renderer(report, results_dir, readme_dir))

    lines = [
        "## Results",
        "",
        "Generated by `python benchmarks/write_results.py` from the JSON files in "
        f"`{Path(os.path.relpath(results_dir, readme_dir)).as_posix()}/`; every figure is as measured, targets missed "
        "included. Machine(s): "
        + ("; ".join(f"{m or 'unrecorded'} ({d})" for m, d in sorted(machines, key=str)) or "none yet")
        + ".",
    ]
    toys = {path.stem: json.loads(path.read_text()) for path in sorted(results_dir.glob("matching_toy_*.json"))}
    toys = {name: report for name, report in toys.items() if "runs" in report}
    if toys:
        machines.add((next(iter(toys.values())).get("machine"), "cpu"))
        sections.append(render_matching_toy(toys, results_dir, readme_dir))
    for number, name, renderer in ((6, "pass_at_k", render_pass_at_k), (7, "replay", render_replay)):
        path = results_dir / f"{name}.json"
        if not path.is_file():
            missing.append(f"{number} ({name.replace('_', ' ')})")
            continue
        report = json.loads(path.read_text())
        machines.add((report.get("machine"), report.get("device", "cpu")))
        sections.append(renderer(report, results_dir, readme_dir))
    if missing:
        lines += ["", "Not run yet: benchmark " + ", ".join(missing) + "."]
    for section in sections:
        lines += [""] + section
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the start and end marker lines replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(
            f"The README must hold exactly one {START!r} line followed by one {END!r} line; add them where the "
            "results section belongs."
        )
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    block = render(Path(args.results_dir), readme.resolve().parent)
    if args.print:
        print(block, end="")
        return
    try:
        updated = replace_block(readme.read_text(), block)
    except ValueError as error:
        sys.exit(f"{readme}: {error}")
    readme.write_text(updated)
    print(f"updated the results section of {readme}")


if __name__ == "__main__":
    main(sys.argv[1:])
