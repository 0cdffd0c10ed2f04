"""Pre-train an embedded tiny model on a built-in task, and write it into the package.

    python scripts/pretrain_tiny_model.py                       # writes trl_flowrl/assets/tiny-qwen2-arithmetic
    python scripts/pretrain_tiny_model.py --task programs       # writes trl_flowrl/assets/tiny-qwen2-programs
    python scripts/pretrain_tiny_model.py --output_dir /tmp/m --steps 200

Supervised next-token training on prompt + completion, with the loss on the completion only, so that the model starts
out spreading its samples over many valid answers, and is right on only part of the held-out problems when sampled at
temperature 1, leaving RL something to improve. Training problems come from the train split only: no held-out problem
is ever seen.

- arithmetic: each completion is drawn uniformly among the problem's distinct reasoning paths, and training stops early
  on purpose;
- programs: each completion is one of the problem's listed correct programs or, half of the time, one of its listed
  wrong programs (`programming.pretraining_completion`), and training runs until the model copies the problem's
  constant: it then writes a correct program about half of the time, and nearly every failure is a listed wrong
  construction, which a 1/0 reward from the tests can teach it to avoid. (The copy is learned late: with `--eval_every
  1000`, held-out pass rate 13% at step 1000, 22% at 2000, 49% at 3000, measured with the earlier four-head model.)

Both models have head size 32 (hidden 96, 3 query heads, 1 key-value head), a size vLLM's CPU attention serves.
Re-trained so on 2026-12-07 from the earlier four-head models (head size 24, which vLLM refuses): held-out accuracy
41.2% -> 41.2% (arithmetic, 128 problems x 8; pass@8 96.9% -> 97.7%, distinct correct paths 2.70 -> 2.70) and
47.0% -> 46.0% (programs, 37 x 8; pass@8 100% both, distinct passing programs 2.51 -> 2.54), each written into
`pretraining.json`.

The model and optimisation settings default per task (`TASK_DEFAULTS`); any of them can be overridden on the command
line. Deterministic from `--seed` for a given machine and thread count (`--num_threads`, per task): the data order,
the initialisation and the sampling used for the final report are all seeded.
"""

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trl_flowrl.evaluation import arithmetic_benchmark, evaluate, programs_benchmark
from trl_flowrl.tasks import (
    EMBEDDED_MODELS,
    MAX_VALUE,
    NUM_CASES,
    NUM_TERMS,
    enumerate_paths,
    generate_problems,
    programming,
)
from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2


ASSETS = Path(__file__).resolve().parent.parent / "trl_flowrl" / "assets"

# The settings each shipped model was trained with: changing the arithmetic ones changes the shipped arithmetic model.
TASK_DEFAULTS = {
    "arithmetic": {
        "hidden_size": 96,
        "num_layers": 4,
        # Head size 32 (96 / 3): vLLM's CPU attention serves head sizes 32, 64, 80, ... only.
        "num_heads": 3,
        "num_kv_heads": 1,
        "intermediate_size": 256,
        "max_position_embeddings": 256,
        "steps": 800,
        "batch_size": 64,
        "learning_rate": 3e-3,
        "warmup_steps": 50,
        "weight_decay": 0.01,
        "eval_problems": 128,
        "eval_samples": 8,
        "max_new_tokens": 64,
        # One thread: the weights depend on the thread count, and the two models can then be trained side by side.
        "num_threads": 1,
    },
    "programs": {
        "hidden_size": 96,
        "num_layers": 4,
        # Head size 32 (96 / 3): vLLM's CPU attention serves head sizes 32, 64, 80, ... only.
        "num_heads": 3,
        "num_kv_heads": 1,
        "intermediate_size": 256,
        "max_position_embeddings": 512,
        "steps": 3000,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "warmup_steps": 50,
        "weight_decay": 0.01,
        "eval_problems": 37,  # the whole held-out split
        "eval_samples": 8,
        "max_new_tokens": 128,
        # One thread: the shipped model was trained so, and the weights depend on the thread count.
        "num_threads": 1,
    },
}


@dataclass
class PretrainArguments:
    task: str = "arithmetic"  # "arithmetic" or "programs"
    seed: int = 0
    output_dir: str | None = None  # default: the task's embedded model folder in trl_flowrl/assets
    # arithmetic task
    num_terms: int = NUM_TERMS
    max_value: int = MAX_VALUE
    # programs task
    num_cases: int = NUM_CASES
    # model (Qwen2); None: the task's default in TASK_DEFAULTS
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    # optimisation
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    num_threads: int | None = None
    # report
    eval_problems: int | None = None
    eval_samples: int | None = None
    max_new_tokens: int | None = None
    log_every: int = 100
    eval_every: int = 0  # also report held-out accuracy every this many steps (0: only at the end)

    def __post_init__(self):
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"--task must be one of {sorted(TASK_DEFAULTS)}, got {self.task!r}.")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.output_dir is None:
            self.output_dir = str(ASSETS / EMBEDDED_MODELS[self.task])


def parse_args() -> PretrainArguments:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PretrainArguments):
        example = TASK_DEFAULTS["arithmetic"].get(f.name, f.default)
        parser.add_argument(f"--{f.name}", type=str if example is None else type(example), default=f.default)
    return PretrainArguments(**vars(parser.parse_args()))


def draw_completion(problem, rng: random.Random) -> str:
    """One pre-training completion: a uniformly drawn reasoning path, or for a program, a listed correct or wrong
    program (`programming.pretraining_completion`)."""
    if isinstance(problem, programming.ProgrammingProblem):
        return programming.pretraining_completion(problem, rng)
    return rng.choice(list(enumerate_paths(problem).values()))


def make_batch(tokenizer, problems, rng: random.Random):
    """Right-padded input ids and labels; labels are -100 except on the completion and its end-of-sequence token."""
    sequences, labels = [], []
    for problem in problems:
        prompt = tokenizer.apply_chat_template(problem.prompt, tokenize=False, add_generation_prompt=True)
        completion = draw_completion(problem, rng)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    length = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (length - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    label_ids = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
    return input_ids, attention_mask, label_ids


def main(args: PretrainArguments):
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(
        tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
    )
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.98),
    )

    def lr_factor(step):  # linear warm-up, then cosine decay to 10%
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # One stream of train-split problems (repeats allowed); the held-out split is never drawn from.
    if args.task == "arithmetic":
        problems = generate_problems(
            args.steps * args.batch_size, args.seed, "train", args.num_terms, args.max_value, unique=False
        )
        held_out = arithmetic_benchmark(args.eval_problems, args.seed, args.num_terms, args.max_value)
    else:
        problems = programming.generate_problems(
            args.steps * args.batch_size, args.seed, "train", args.num_cases, unique=False
        )
        held_out = programs_benchmark(args.eval_problems, args.seed)

    def evaluate_held_out() -> dict:
        """Held-out accuracy and diversity at temperature 1, as the recipes measure them (`trl_flowrl.evaluation`)."""
        results = evaluate(
            {"model": model},
            held_out,
            num_samples=args.eval_samples,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            tokenizer=tokenizer,
            backend="transformers",
            seed=args.seed,
            plots=False,
            progress=False,
        )
        scores = results["models"]["model"]["benchmarks"][held_out.name]
        return {
            "accuracy": round(scores["avg_at_k"], 4),
            f"pass_at_{args.eval_samples}": round(scores["pass_at_k"][str(args.eval_samples)], 4),
            "distinct_correct_paths": round(scores["diversity"]["distinct_correct_paths"], 3),
            "mean_completion_tokens": round(scores["generation"]["mean_completion_tokens"], 1),
        }

    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(args.steps):
        input_ids, attention_mask, labels = make_batch(
            tokenizer, problems[step * args.batch_size : (step + 1) * args.batch_size], rng
        )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1:5d}  loss {running / args.log_every:.4f}  {time.perf_counter() - start:6.1f}s")
            running = 0.0
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(f"step {step + 1:5d}  held-out {evaluate_held_out()}")
    train_seconds = time.perf_counter() - start

    held_out_report = evaluate_held_out()
    print(f"held-out at temperature 1.0: {held_out_report}")

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = 0
    model.generation_config.max_new_tokens = held_out.max_new_tokens  # what the evaluation generates by default
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = {
        "arguments": asdict(args) | {"output_dir": None},
        "parameters": num_params,
        "train_seconds": round(train_seconds, 1),
        "held_out": {
            "problems": args.eval_problems,
            "samples_per_problem": args.eval_samples,
            "temperature": 1.0,
            **held_out_report,
        },
    }
    (output / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    size_mb = (output / "model.safetensors").stat().st_size / 1e6
    print(f"saved to {output} ({size_mb:.2f} MB safetensors), training took {train_seconds:.0f}s")


if __name__ == "__main__":
    main(parse_args())
