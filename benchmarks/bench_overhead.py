"""Benchmark 1: step time and peak memory of FlowRLTrainer and ExGRPOTrainer relative to GRPOTrainer.

    python benchmarks/bench_overhead.py                        # the embedded model and task, the recipes' settings
    python benchmarks/bench_overhead.py --model PATH --device cuda --num_threads 8   # any local checkpoint on a GPU

Six trainers on the same batch and seeds: GRPO without a KL term, GRPO with one (beta=0.0667: it computes reference
log-probs, as FlowRL always does), FlowRL with the official objective, FlowRL with the matching objective (the group
estimate of log Z, no head) and the same with the log Z head, and ExGRPO. Each run is a fresh process (so its peak memory is its own),
and the runs are interleaved over several rounds, in a rotating order, so that a slow spell of the machine does not
land on one trainer. A run trains `--warmup + --steps` steps and keeps the last `--steps` of TRL's per-step
`step_time` (generation, rewards, reference pass and optimisation included). Peak memory is the peak resident set size
during training (Linux `VmHWM`, reset after the trainer is built) on a CPU, `torch.cuda.max_memory_allocated` on a
GPU. ExGRPO starts replaying at its first step here: the embedded model's accuracy is above the 0.35 threshold.

`--model-shape qwen2.5-0.5b` trains a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151,936) instead of the embedded one, with the embedded character tokenizer
(its ids are a subset of the vocabulary): for GPU figures (`benchmarks/gpu_overhead.sh`).

Targets: FlowRL matching within 3% of GRPO with KL, and with the group estimate no slower than with the head (issue
9); ExGRPO within 5% of GRPO (issue 10); FlowRL official within 3% of GRPO with KL (issue 6). Prints a table and the
ratios, and writes `overhead.json` (`overhead_<device>.json` off the CPU) and its plot to `--output_dir`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "recipes" / "configs" / "embedded"
TRAINERS = ("grpo", "grpo_kl", "flowrl", "flowrl_matching", "flowrl_matching_head", "exgrpo")
TARGETS = {
    ("flowrl_matching", "grpo_kl"): 1.03,
    ("flowrl_matching", "flowrl_matching_head"): 1.0,
    ("exgrpo", "grpo"): 1.05,
    ("flowrl", "grpo_kl"): 1.03,
}
# Each trainer's flags on top of its embedded recipe (FlowRL's name their objective, whatever the recipe's default).
TRAINER_FLAGS = {
    "grpo": [],
    "grpo_kl": ["--beta=0.0667"],
    "flowrl": ["--objective=official", "--beta=15"],
    "flowrl_matching": ["--objective=matching", "--beta=15"],
    "flowrl_matching_head": ["--objective=matching", "--beta=15", "--log_z_estimate=head"],
    "exgrpo": [],
}
QWEN25_05B = dict(
    hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, max_position_embeddings=32768
)

sys.path.insert(0, str(REPO / "benchmarks"))
from reporting import machine  # noqa: E402  (the benchmarks' shared description of the machine)

from trl_flowrl._compat import package_versions  # noqa: E402


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(name: str, args) -> dict:
    """One training run in this process; returns its step times and peak memory."""
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_flowrl import ExGRPOConfig, ExGRPOTrainer, FlowRLConfig, FlowRLTrainer
    from trl_flowrl.recipe import parse_recipe_args
    from trl_flowrl.rewards import MathAccuracyReward
    from trl_flowrl.tasks import arithmetic_dataset, embedded_model_path
    from trl_flowrl.vllm_cpu import keep_cpu_weights_loadable

    torch.set_num_threads(args.num_threads)
    config_cls, trainer_cls, yaml_name = {
        "grpo": (GRPOConfig, GRPOTrainer, "grpo"),
        "grpo_kl": (GRPOConfig, GRPOTrainer, "grpo"),
        "flowrl": (FlowRLConfig, FlowRLTrainer, "flowrl"),
        "flowrl_matching": (FlowRLConfig, FlowRLTrainer, "flowrl"),
        "flowrl_matching_head": (FlowRLConfig, FlowRLTrainer, "flowrl"),
        "exgrpo": (ExGRPOConfig, ExGRPOTrainer, "exgrpo"),
    }[name]
    overrides = [
        f"--max_steps={args.warmup + args.steps}",
        "--logging_steps=1",
        f"--per_device_train_batch_size={args.batch_size}",
        f"--seed={args.seed}",
        "--disable_tqdm=true",
    ]
    overrides += TRAINER_FLAGS[name]
    if args.device == "cuda":
        overrides += ["--bf16=true", "--dataloader_pin_memory=true"]
    else:
        overrides.append("--use_cpu=true")
    if args.use_vllm:
        overrides += ["--use_vllm=true", "--vllm_mode=colocate"]
    with tempfile.TemporaryDirectory() as output_dir:
        _, training_args, _ = parse_recipe_args(
            config_cls, EMBEDDED / f"{yaml_name}_arithmetic.yaml", argv=[*overrides, f"--output_dir={output_dir}"]
        )
        keep_cpu_weights_loadable(training_args)  # vLLM's CPU build only
        trainer = trainer_cls(
            model=args.model or embedded_model_path(),
            processing_class=AutoTokenizer.from_pretrained(args.model or embedded_model_path()),
            reward_funcs=[MathAccuracyReward()],
            args=training_args,
            train_dataset=arithmetic_dataset(2000, seed=args.seed),
        )
        rss_before = _rss_mb("VmRSS")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _rss_mb("VmHWM")
    times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    return {
        "trainer": name,
        "step_times": times[args.warmup :],
        "peak_memory_mb": peak,
        "rss_before_training_mb": rss_before,
        # ExGRPO: the time spent scoring stored trajectories by entropy, per step (part of step_time)
        "entropy_scoring_s": [
            e["replay/entropy_scoring_time"]
            for e in trainer.state.log_history[args.warmup :]
            if "replay/entropy_scoring_time" in e
        ],
    }


def build_shaped_model(shape: str, directory: Path) -> str:
    """A randomly initialised Qwen2 of `shape` with the embedded character tokenizer, saved in `directory`."""
    import torch

    from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_qwen2(tokenizer, **QWEN25_05B)
    model.resize_token_embeddings(151936)  # Qwen2.5's vocabulary: the LM head costs what it costs there
    model.config.tie_word_embeddings = True
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(
        names, [summary[n]["step_time_s"] for n in names], yerr=[summary[n]["step_time_spread_s"] for n in names]
    )
    axes[0].set_ylabel("median step time (s)")
    axes[1].bar(names, [summary[n]["peak_memory_mb"] for n in names])
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("Step time and peak memory, same batch and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local checkpoint (default: the embedded tiny model)")
    parser.add_argument(
        "--model-shape",
        choices=["qwen2.5-0.5b"],
        default=None,
        help="a randomly initialised model of this shape, with the embedded tokenizer (instead of --model)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per trainer")
    parser.add_argument("--batch_size", type=int, default=64, help="completions per step (8 per problem)")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir", "--output_dir", dest="output_dir", default=str(REPO / "benchmarks" / "results")
    )
    parser.add_argument(
        "--use_vllm",
        action="store_true",
        help="generate with vLLM in colocate mode (the engine's start-up falls in the warm-up steps)",
    )
    parser.add_argument("--smoke", action="store_true", help="1 round of 2 steps, to check that the script runs")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.batch_size = 2, 1, 1, 16
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    argv = list(sys.argv[1:])
    shaped = None
    if args.model_shape:
        shaped = tempfile.TemporaryDirectory()
        args.model = build_shaped_model(args.model_shape, Path(shaped.name))
        argv += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = str(args.num_threads)
    runs = {name: [] for name in TRAINERS}
    start = time.perf_counter()
    for round_index in range(args.rounds):
        order = TRAINERS[round_index % len(TRAINERS) :] + TRAINERS[: round_index % len(TRAINERS)]
        for name in order:
            command = [sys.executable, __file__, "--worker", name, *argv]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
            line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
            runs[name].append(json.loads(line[len("RESULT ") :]))
            print(
                f"round {round_index + 1}/{args.rounds} {name:8s} median step "
                f"{statistics.median(runs[name][-1]['step_times']):.3f} s",
                flush=True,
            )

    summary = {}
    for name, results in runs.items():
        medians = [statistics.median(r["step_times"]) for r in results]
        summary[name] = {
            "step_time_s": statistics.median(medians),
            "step_time_spread_s": (max(medians) - min(medians)) / 2,
            "step_time_per_round_s": medians,
            "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in results),
        }
        scoring = [t for r in results for t in r["entropy_scoring_s"]]
        if scoring:
            summary[name]["entropy_scoring_s"] = statistics.mean(scoring)
            summary[name]["entropy_scoring_fraction"] = statistics.mean(scoring) / summary[name]["step_time_s"]
    pairs = [*TARGETS, ("flowrl", "grpo"), ("flowrl_matching", "grpo"), ("grpo_kl", "grpo")]
    ratios = {f"{a}/{b}": summary[a]["step_time_s"] / summary[b]["step_time_s"] for a, b in pairs}
    memory_ratios = {
        f"{a}/{b}": summary[a]["peak_memory_mb"] / summary[b]["peak_memory_mb"]
        for a, b in [("flowrl", "grpo_kl"), ("flowrl_matching", "grpo_kl"), ("exgrpo", "grpo")]
    }
    targets = {
        f"{a}/{b}": {"target": limit, "ratio": ratios[f"{a}/{b}"], "met": ratios[f"{a}/{b}"] <= limit}
        for (a, b), limit in TARGETS.items()
    }

    print(f"\n{'trainer':22s} {'step time (s)':>14s} {'spread':>8s} {'peak memory (MiB)':>18s}")
    for name, s in summary.items():
        print(f"{name:22s} {s['step_time_s']:14.3f} {s['step_time_spread_s']:8.3f} {s['peak_memory_mb']:18.0f}")
    if "entropy_scoring_fraction" in summary["exgrpo"]:
        print(
            f"ExGRPO entropy scoring: {summary['exgrpo']['entropy_scoring_s']:.3f} s per step, "
            f"{100 * summary['exgrpo']['entropy_scoring_fraction']:.1f}% of its step time"
        )
    print("\nstep-time ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("peak-memory ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in memory_ratios.items()))
    for key, t in targets.items():
        print(f"target {key} <= {t['target']:.2f}: {t['ratio']:.3f} ({'met' if t['met'] else 'missed'})")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "overhead",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "device": args.device,
        "versions": package_versions(),
        "settings": {
            k: getattr(args, k)
            for k in ("model_shape", "steps", "warmup", "rounds", "batch_size", "num_threads", "seed", "use_vllm")
        }
        | {"model": None if args.model_shape else args.model, "trainer_flags": TRAINER_FLAGS},
        "wall_time_s": time.perf_counter() - start,
        "summary": summary,
        "step_time_ratios": ratios,
        "peak_memory_ratios": memory_ratios,
        "targets": targets,
        "runs": runs,
    }
    if args.device == "cuda":
        import torch

        report["machine"] += f", {torch.cuda.get_device_name(0)}"
    stem = ("overhead" if args.device == "cpu" else f"overhead_{args.device}") + ("_vllm" if args.use_vllm else "")
    (output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(summary, output_dir / f"{stem}.png")
    print(f"\nwrote {output_dir / stem}.json and {stem}.png")
    if shaped is not None:
        shaped.cleanup()


if __name__ == "__main__":
    main()
