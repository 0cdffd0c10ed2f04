"""Step time of ExGRPOTrainer relative to GRPOTrainer, and how much of ExGRPO's step its additions take.

Both trainers run the same tiny setup (same model, data, seeds, batch), interleaved (GRPO, ExGRPO, GRPO, ...) so that
load from other processes affects both alike. A step is timed, in wall and in CPU time, from one optimizer step's end to the next
(generation, forward/backward, optimizer, ExGRPO's buffer merge); the first `--warmup` steps of each run are dropped. ExGRPO's
additions are timed with wrappers around its methods:

- scoring: the entropy scoring of the replayed questions' stored trajectories (forward passes under no_grad);
- planning: the whole pre-generation plan, scoring included (question ids, shared draws, row replacement);
- merge: gathering and merging the collected trajectories after each optimizer step.

The reward is "the completion's token ids sum to an even number": about half of the random tiny model's completions
are correct, so ExGRPO leaves warm-up at the first step and replays from the second.

    python benchmarks/exgrpo_step_time.py                 # the tiny test model (about 30k parameters)
    python benchmarks/exgrpo_step_time.py --hidden_size 256 --num_layers 4
"""

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from trl_flowrl.exgrpo import ExGRPOConfig, ExGRPOTrainer  # noqa: E402
from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2  # noqa: E402


def parity_reward(completion_ids, **kwargs):
    return [float(sum(ids) % 2 == 0) for ids in completion_ids]


def clocks():
    """(wall, CPU) seconds. With one torch thread the process's CPU time is its compute, which other jobs on the
    machine disturb much less than its wall time."""
    return time.perf_counter(), time.process_time()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.last, self.times = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.last is None:
            self.last = clocks()

    def on_step_end(self, args, state, control, **kwargs):
        now = clocks()
        self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


def timed(trainer, name, totals):
    method = getattr(trainer, name)

    def wrapper(*args, **kwargs):
        start = clocks()
        try:
            return method(*args, **kwargs)
        finally:
            end = clocks()
            totals[name].append((end[0] - start[0], end[1] - start[1]))

    setattr(trainer, name, wrapper)


def run(kind, model_path, dataset, cli, output_dir):
    common = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=cli.batch_size,
        gradient_accumulation_steps=cli.accumulation,
        num_generations=cli.num_generations,
        max_completion_length=cli.max_completion_length,
        max_steps=cli.steps,
        learning_rate=1e-3,
        logging_steps=cli.steps,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        # the paper's aggregation and advantage, for both
        loss_type="dr_grpo",
        scale_rewards="none",
    )
    if kind == "grpo":
        trainer = GRPOTrainer(model_path, parity_reward, args=GRPOConfig(**common), train_dataset=dataset)
    else:
        trainer = ExGRPOTrainer(model_path, parity_reward, args=ExGRPOConfig(**common), train_dataset=dataset)
    totals = defaultdict(list)
    if kind == "exgrpo":
        for name in ("_score_trajectories", "_plan_generation", "_merge_pending_trajectories"):
            timed(trainer, name, totals)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    steps = timer.times[cli.warmup :]
    extra = {}
    if kind == "exgrpo":
        # the additions happen in every step after warm-up (one generation per optimizer step here)
        extra = {
            name: tuple(sum(v[i] for v in values[cli.warmup :]) / len(steps) for i in (0, 1))
            for name, values in totals.items()
        }
        extra["buffer_trajectories"] = trainer.replay_buffer.num_trajectories
        extra["buffer_questions"] = trainer.replay_buffer.num_questions
    return steps, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=32)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tokenizer = build_char_tokenizer()
        heads = max(4, cli.hidden_size // 32)
        model = build_tiny_qwen2(
            tokenizer,
            hidden_size=cli.hidden_size,
            num_layers=cli.num_layers,
            num_heads=heads,
            num_kv_heads=heads // 2,
            intermediate_size=2 * cli.hidden_size,
        )
        parameters = sum(p.numel() for p in model.parameters())
        model_path = os.path.join(tmp, "model")
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
        dataset = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(10) for b in range(10)]
        )

        step_times = {"grpo": [], "exgrpo": []}
        extras = []
        for repeat in range(cli.repeats):
            for kind in ("grpo", "exgrpo"):
                steps, extra = run(kind, model_path, dataset, cli, os.path.join(tmp, f"{kind}-{repeat}"))
                step_times[kind].extend(steps)
                if extra:
                    extras.append(extra)

    rows = cli.batch_size * cli.accumulation
    print(
        f"model: {parameters} parameters; {rows} rows ({rows // cli.num_generations} questions x "
        f"{cli.num_generations}) per step, {cli.max_completion_length} completion tokens; {cli.steps} steps "
        f"({cli.warmup} dropped) x {cli.repeats} interleaved runs each; {cli.threads} torch thread(s)"
    )
    for i, clock in enumerate(("wall", "CPU")):
        grpo = statistics.median(t[i] for t in step_times["grpo"])
        exgrpo = statistics.median(t[i] for t in step_times["exgrpo"])
        print(
            f"median {clock} step time: GRPO {grpo * 1000:.1f} ms, ExGRPO {exgrpo * 1000:.1f} ms, "
            f"ExGRPO / GRPO = {exgrpo / grpo:.3f}"
        )
        mean_exgrpo = statistics.mean(t[i] for t in step_times["exgrpo"])
        for name, label in (
            ("_score_trajectories", "entropy scoring"),
            ("_plan_generation", "planning (scoring included)"),
            ("_merge_pending_trajectories", "buffer merge"),
        ):
            per_step = statistics.mean(e[name][i] for e in extras)
            print(
                f"    ExGRPO {label}: {per_step * 1000:.2f} ms {clock} per step = "
                f"{100 * per_step / mean_exgrpo:.1f}% of its mean step"
            )
    print(
        "buffer at the end: "
        + ", ".join(f"{e['buffer_questions']} questions / {e['buffer_trajectories']} trajectories" for e in extras)
    )


if __name__ == "__main__":
    main()
