"""Pre-train the embedded tiny model on the built-in arithmetic task, and write it into the package.

    python scripts/pretrain_tiny_model.py                       # writes trl_flowrl/assets/tiny-qwen2-arithmetic
    python scripts/pretrain_tiny_model.py --output_dir /tmp/m --steps 200

Supervised next-token training on prompt + completion, with the loss on the completion only; each completion is one
valid reasoning path drawn uniformly among the problem's paths, so the model starts out spreading its samples over
many paths. Training problems come from the train split only: no held-out problem (by multiset of terms) is ever
seen. Training stops early on purpose: the model should be right on only part of the held-out problems when sampled
at temperature 1, so that RL has something to improve.

Deterministic from `--seed` for a given machine and thread count (`--num_threads`, 2 by default): the data order,
the initialisation and the sampling used for the final report are all seeded.
"""

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trl_flowrl.tasks import (
    EMBEDDED_MODEL_NAME,
    MAX_VALUE,
    NUM_TERMS,
    enumerate_paths,
    evaluate_arithmetic,
    generate_problems,
)
from trl_flowrl.tiny_models import build_char_tokenizer, build_tiny_qwen2


DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "trl_flowrl" / "assets" / EMBEDDED_MODEL_NAME


@dataclass
class PretrainArguments:
    seed: int = 0
    output_dir: str = str(DEFAULT_OUTPUT)
    # task
    num_terms: int = NUM_TERMS
    max_value: int = MAX_VALUE
    # model (Qwen2)
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    # optimisation
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    num_threads: int = 2
    # report
    eval_problems: int = 128
    eval_samples: int = 8
    log_every: int = 100
    eval_every: int = 0  # also report held-out accuracy every this many steps (0: only at the end)


def parse_args() -> PretrainArguments:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PretrainArguments):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return PretrainArguments(**vars(parser.parse_args()))


def make_batch(tokenizer, problems, rng: random.Random):
    """Right-padded input ids and labels; labels are -100 except on the completion and its end-of-sequence token."""
    sequences, labels = [], []
    for problem in problems:
        prompt = tokenizer.apply_chat_template(problem.prompt, tokenize=False, add_generation_prompt=True)
        completion = rng.choice(list(enumerate_paths(problem).values()))
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
        max_position_embeddings=256,
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
    problems = generate_problems(
        args.steps * args.batch_size, args.seed, "train", args.num_terms, args.max_value, unique=False
    )

    held_out = generate_problems(args.eval_problems, args.seed, "test", args.num_terms, args.max_value)
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
            result = evaluate_arithmetic(model, tokenizer, held_out, num_samples=args.eval_samples, seed=args.seed)
            print(f"step {step + 1:5d}  held-out {result.summary()}")
    train_seconds = time.perf_counter() - start

    result = evaluate_arithmetic(model, tokenizer, held_out, num_samples=args.eval_samples, seed=args.seed)
    print(f"held-out at temperature 1.0: {result.summary()}, valid paths {100 * result.valid_path_rate:.1f}%")

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 1.0
    model.generation_config.top_k = 0
    model.generation_config.max_new_tokens = 80
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
            "accuracy": round(result.accuracy, 4),
            "pass_at_k": round(result.pass_at_k, 4),
            "distinct_correct_paths": round(result.distinct_correct_paths, 3),
            "valid_path_rate": round(result.valid_path_rate, 4),
        },
    }
    (output / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    size_mb = (output / "model.safetensors").stat().st_size / 1e6
    print(f"saved to {output} ({size_mb:.2f} MB safetensors), training took {train_seconds:.0f}s")


if __name__ == "__main__":
    main(parse_args())
