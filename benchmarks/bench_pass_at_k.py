"""Benchmark 6: does FlowRL's diversity pay off as pass@k at large k, on the programming task?

    python benchmarks/bench_pass_at_k.py                 # 3 arms x 3 seeds, the code recipes' settings, 64 samples
    python benchmarks/bench_pass_at_k.py --arms grpo,flowrl_matching --seeds 0
    python benchmarks/bench_pass_at_k.py --smoke         # a check that it runs (2 steps, 2 problems x 4 samples)

On the arithmetic task pass@16 is 100% for every arm, so it separates nothing; the built-in programming task starts
at about 46% held-out and has several correct programs per problem. Three arms (`arms.ARMS`), each trained with
exactly its code recipe as a user runs it (`recipes/grpo_code.py` or `recipes/flowrl_code.py`, embedded settings:
60 steps, 4 problems x 8 completions, learning rate 5e-4 for every arm, the 1/0 reward of the tests) plus the arm's
overrides and the seed:

- `grpo`: GRPO as the recipe has it (no KL term);
- `flowrl`: FlowRL's official objective (`--objective official --beta 15`), the paper's loss;
- `flowrl_matching`: FlowRL's matching objective at its preset (`--objective matching --beta 15`).

Every final model, and the initial one, is then evaluated with `python -m trl_flowrl.evaluation` on all 37 held-out
problems (tests drawn with seed 0, the same for every model): `--samples` (64) samples per problem at temperature 1.0,
top_p 1.0, 128 new tokens, sampling seed 0. Reported per arm, over seeds: the unbiased pass@k (`pass_at_k`, from each
problem's correct count) for every k from 1 to the number of samples, avg@k, and distinct passing programs per problem
(programs told apart by their syntax tree, `trl_flowrl.tasks.program_id`; 0 for an unsolved problem) and per solved
problem. Runs go two at a time (`--jobs`), each process on one torch thread.

Targets (issue 18), FlowRL matching against GRPO, means over seeds: pass@64 at least GRPO's, pass@1 no more than 3
points below GRPO's. The official objective is reported against the same thresholds (information). Writes
`pass_at_k.json` and `pass_at_k.png` to `--output-dir`. Nothing is tuned to meet a target: the learning rate is the
recipes' (no learning-rate protocol here; the task has no validation split of its own).

Runs are kept in `--cache-dir`, keyed by the recipe, the arm's overrides, the seed, the steps, the code of `trl_flowrl`
and the embedded model's files; an evaluation by its settings as well. `--no-cache` runs everything again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arms import ARMS as ALL_ARMS
from arms import COLORS, LABELS
from reporting import command_line, pyplot, report_header, write_json
from run_options import parse_arms
from runs import REPO, files_digest, source_digest


ARMS = ("grpo", "flowrl", "flowrl_matching")
BASELINE = "grpo"
TARGET_ARM = "flowrl_matching"
PASS_AT_LARGE_K_AT_LEAST_BASELINE = True  # pass@k at the largest k: at least GRPO's
PASS_AT_1_DROP_POINTS = 3.0  # pass@1: at most this many points below GRPO's
CODE_RUN_FORMAT = 1  # bump when what a cached run or evaluation holds changes
DEFAULT_CACHE = REPO / "outputs" / "benchmarks" / "code_runs"


def recipe_script(trainer: str) -> Path:
    return REPO / "recipes" / f"{trainer}_code.py"


def recipe_config(trainer: str) -> Path:
    return REPO / "recipes" / "configs" / "embedded" / f"{trainer}_programs.yaml"


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _subprocess_env() -> dict:
    """One torch thread per process, and this checkout's `trl_flowrl` first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_logged(command: list[str], log: Path) -> float:
    """Run `command`, its output to `log`; returns its wall time. Raises with the log's end if it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, env=_subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}; end of {log}:\n{tail}")
    return time.perf_counter() - start


def train(arm: str, seed: int, steps: int, cache_dir: Path, use_cache: bool) -> dict:
    """The arm's code recipe with `seed` and `steps`: the saved model's directory and the training wall time."""
    from trl_flowrl.tasks import embedded_model_path

    trainer = ALL_ARMS[arm].trainer
    overrides = list(ALL_ARMS[arm].overrides)
    key = _digest(
        {
            "format": CODE_RUN_FORMAT,
            "script": recipe_script(trainer).read_text(),
            "config": recipe_config(trainer).read_text(),
            "overrides": overrides,
            "seed": seed,
            "steps": steps,
            "source": source_digest(trainer, skip_unused_by_arithmetic=False),
            "model": files_digest(Path(embedded_model_path("programs"))),
        }
    )
    directory = cache_dir / f"{arm}-seed{seed}-steps{steps}-{key}"
    done = directory / "run.json"
    if use_cache and done.is_file():
        return json.loads(done.read_text()) | {"cached": True}
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    command = [sys.executable, str(recipe_script(trainer)), *overrides]
    command += ["--seed", str(seed), "--max_steps", str(steps), "--output_dir", str(partial)]
    command += ["--num_eval_problems", "0", "--num_threads", "1", "--disable_tqdm", "true"]  # evaluated below
    print(f"train {LABELS[arm]} seed {seed} ({steps} steps) -> {directory.name}", flush=True)
    seconds = _run_logged(command, partial / "train.log")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    record = {"arm": arm, "seed": seed, "steps": steps, "model": str(directory), "train_seconds": seconds}
    write_json(done, record)
    return record | {"cached": False}


def evaluate(model: str, label: str, eval_dir: Path, samples: int, limit: int | None, use_cache: bool) -> dict:
    """`python -m trl_flowrl.evaluation` on the programs benchmark: per-problem correct counts and distinct passing
    programs, the pass@k curve for every k up to `samples`, and the evaluation's wall time."""
    from trl_flowrl.evaluation.metrics import pass_at_k_curve

    settings = {"format": CODE_RUN_FORMAT, "samples": samples, "limit": limit, "temperature": 1.0, "top_p": 1.0}
    directory = eval_dir / f"eval-{_digest(settings)}"
    results_file = directory / "results.json"
    seconds = None
    if not (use_cache and results_file.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "trl_flowrl.evaluation", "--model", f"{label}={model}"]
        command += ["--benchmarks", "programs", "--num-samples", str(samples), "--temperature", "1.0"]
        command += ["--top-p", "1.0", "--max-new-tokens", "128", "--backend", "transformers", "--seed", "0"]
        command += ["--num-threads", "1", "--no-plots", "--no-progress", "--output-dir", str(directory)]
        command += ["--limit", str(limit)] if limit else []
        print(f"evaluate {label}: {samples} samples per problem", flush=True)
        seconds = _run_logged(command, directory / "evaluate.log")
        (directory / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    results = json.loads(results_file.read_text())
    (entry,) = results["models"].values()
    scores = entry["benchmarks"]["programs"]
    problems = scores["problems"]
    counts = [p["num_correct"] for p in problems]
    curve = pass_at_k_curve([samples] * len(counts), counts, ks=range(1, samples + 1))
    solved = [p["distinct_correct_paths"] for p in problems if p["num_correct"]]
    return {
        "pass_at_k": [curve[k] for k in range(1, samples + 1)],
        "accuracy": scores["avg_at_k"],
        "num_correct": counts,
        "distinct_passing_programs": sum(p["distinct_correct_paths"] or 0 for p in problems) / len(problems),
        "distinct_passing_programs_solved": sum(solved) / len(solved) if solved else None,
        "outcomes": scores["outcomes"],
        "eval_seconds": seconds or json.loads((directory / "seconds.json").read_text())["seconds"],
    }


def mean_and_seeds(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    return {"mean": sum(known) / len(known) if known else None, "per_seed": values}


def summarize_arm(evaluations: list[dict]) -> dict:
    samples = len(evaluations[0]["pass_at_k"])
    return {
        "pass_at_k": [mean_and_seeds([e["pass_at_k"][k] for e in evaluations]) for k in range(samples)],
        "accuracy": mean_and_seeds([e["accuracy"] for e in evaluations]),
        "distinct_passing_programs": mean_and_seeds([e["distinct_passing_programs"] for e in evaluations]),
        "distinct_passing_programs_solved": mean_and_seeds(
            [e["distinct_passing_programs_solved"] for e in evaluations]
        ),
    }


def check(value: float, threshold: float) -> dict:
    return {"value": value, "threshold": threshold, "met": value >= threshold, "margin": value - threshold}


def evaluate_targets(summary: dict, arm: str, role: str) -> dict:
    """pass@k at the largest k at least the baseline's, pass@1 at most `PASS_AT_1_DROP_POINTS` below (points)."""
    a, b = summary[arm], summary[BASELINE]
    largest = len(a["pass_at_k"])
    checks = {
        f"pass@{largest} - {BASELINE}'s (points)": check(
            100 * (a["pass_at_k"][-1]["mean"] - b["pass_at_k"][-1]["mean"]), 0.0
        ),
        f"pass@1 - {BASELINE}'s (points)": check(
            100 * (a["pass_at_k"][0]["mean"] - b["pass_at_k"][0]["mean"]), -PASS_AT_1_DROP_POINTS
        ),
    }
    return {
        "arm": arm,
        "baseline": BASELINE,
        "role": role,
        "checks": checks,
        "met": all(c["met"] for c in checks.values()),
    }


def plot(summary: dict, initial: dict, per_seed: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    ks = list(range(1, len(initial["pass_at_k"]) + 1))
    left.plot(ks, [100 * v for v in initial["pass_at_k"]], "k--", label="initial model")
    for name, arm in summary.items():
        for evaluation in per_seed[name]:
            left.plot(ks, [100 * v for v in evaluation["pass_at_k"]], color=COLORS[name], alpha=0.25, lw=0.8)
        left.plot(ks, [100 * p["mean"] for p in arm["pass_at_k"]], color=COLORS[name], lw=2, label=LABELS[name])
    left.set_xscale("log", base=2)
    left.set_xlabel("k (samples per problem)")
    left.set_ylabel("held-out pass@k (%)")
    left.set_title("pass@k (unbiased; thin: seeds, thick: mean)", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.scatter(
        [initial["distinct_passing_programs"]], [100 * initial["pass_at_k"][0]], color="k", marker="*", s=150
    )
    right.annotate("initial model", (initial["distinct_passing_programs"], 100 * initial["pass_at_k"][0]), fontsize=8)
    for name, evaluations in per_seed.items():
        xs = [e["distinct_passing_programs"] for e in evaluations]
        ys = [100 * e["pass_at_k"][0] for e in evaluations]
        right.scatter(xs, ys, color=COLORS[name], alpha=0.6, label=LABELS[name])
        right.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], color=COLORS[name], marker="X", s=120, edgecolor="k")
    right.set_xlabel("distinct passing programs per held-out problem")
    right.set_ylabel("held-out pass@1 (%)")
    right.set_title("pass@1 against distinct passing programs (dots: seeds, X: mean)", fontsize=10)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (the code recipes': 60)")
    parser.add_argument("--samples", type=int, default=64, help="samples per held-out problem (default 64)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms, of {', '.join(ARMS)}")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where runs and evaluations are kept")
    parser.add_argument("--no-cache", action="store_true", help="train and evaluate everything again")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results (smoke: outputs/...)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, 2 problems x 4 samples")
    args = parser.parse_args(argv)
    try:
        arms = parse_arms(args.arms, ARMS)
    except ValueError as error:
        parser.error(str(error))
    if any(ALL_ARMS[name].trainer not in ("grpo", "flowrl") for name in arms):
        parser.error("only GRPO and FlowRL arms have a code recipe")
    limit = None
    if args.smoke:
        args.seeds, args.steps, args.samples, limit = "0", 2, 4, 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.steps < 1 or args.samples < 1 or args.jobs < 1:
        parser.error("--seeds, --steps, --samples and --jobs must be positive")
    output_dir = Path(args.output_dir) if args.output_dir else REPO / "benchmarks" / "results"
    if args.smoke and not args.output_dir:
        output_dir = REPO / "outputs" / "benchmarks" / "smoke"
    cache_dir = Path(args.cache_dir)
    use_cache = not args.no_cache
    import torch

    torch.set_num_threads(1)  # as the runs it starts: the report's header says what a process used
    start = time.perf_counter()

    def one(job):
        arm, seed = job
        run = train(arm, seed, args.steps, cache_dir, use_cache)
        evaluation = evaluate(run["model"], f"{arm}-seed{seed}", Path(run["model"]), args.samples, limit, use_cache)
        return run | evaluation

    from trl_flowrl.tasks import embedded_model_path

    jobs = [(arm, seed) for seed in seeds for arm in arms]  # interleaved by seed
    initial_dir = cache_dir / f"initial-{files_digest(Path(embedded_model_path('programs')))[:16]}"
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        initial_future = pool.submit(
            evaluate, "embedded:programs", "initial", initial_dir, args.samples, limit, use_cache
        )
        finished = list(pool.map(one, jobs))
        initial = initial_future.result()
    per_seed = {arm: [r for r in finished if r["arm"] == arm] for arm in arms}
    summary = {arm: summarize_arm(per_seed[arm]) for arm in arms}
    evaluations = []
    if BASELINE in summary:
        evaluations = [
            evaluate_targets(summary, arm, "target" if arm == TARGET_ARM else "information")
            for arm in arms
            if arm != BASELINE
        ]

    print(f"\nHeld-out programs, {args.samples} samples per problem, means over seeds {seeds} (per seed):")
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.samples]
    print(f"{'':28s} {'initial':>8s} " + " ".join(f"{LABELS[a]:>28s}" for a in arms))
    rows = [(f"pass@{k} (%)", lambda e, k=k: 100 * e["pass_at_k"][k - 1]) for k in ks]
    rows += [("avg@k (%)", lambda e: 100 * e["accuracy"])]
    rows += [("distinct passing programs", lambda e: e["distinct_passing_programs"])]
    for title, value in rows:
        cells = []
        for arm in arms:
            values = [value(e) for e in per_seed[arm]]
            cells.append(f"{sum(values) / len(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        print(f"{title:28s} {value(initial):8.1f} " + " ".join(f"{c:>28s}" for c in cells))
    for evaluation in evaluations:
        verdict = "met" if evaluation["met"] else "MISSED"
        print(f"\n{LABELS[evaluation['arm']]} against {LABELS[BASELINE]} ({evaluation['role']}): {verdict}")
        for name, c in evaluation["checks"].items():
            state = f"met (margin {c['margin']:.1f})" if c["met"] else f"MISSED by {-c['margin']:.1f}"
            print(f"  {name}: {c['value']:+.1f}; target >= {c['threshold']:+.1f}: {state}")

    settings = {
        "seeds": seeds,
        "steps": args.steps,
        "samples": args.samples,
        "problems": limit or "all held-out",
        "eval": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 128, "sampling_seed": 0, "tests_seed": 0},
        "jobs": args.jobs,
        "arms": {
            name: {
                "trainer": ALL_ARMS[name].trainer,
                "overrides": list(ALL_ARMS[name].overrides),
                "label": LABELS[name],
            }
            for name in arms
        },
        "recipes": {name: str(recipe_config(ALL_ARMS[name].trainer).relative_to(REPO)) for name in arms},
    }
    report = report_header("pass_at_k", args.smoke, settings, command_line(__file__, argv))
    report.update(
        {
            "wall_time_s": time.perf_counter() - start,
            "initial": initial,
            "summary": summary,
            "evaluations": evaluations,
            "runs": {arm: [{k: v for k, v in r.items() if k != "model"} for r in per_seed[arm]] for arm in arms},
        }
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "pass_at_k.json", report)
    plot(summary, initial, per_seed, output_dir / "pass_at_k.png")
    print(f"\nwrote {output_dir / 'pass_at_k.json'} and pass_at_k.png")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
