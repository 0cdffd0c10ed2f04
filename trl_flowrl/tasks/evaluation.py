"""Sample a model on arithmetic problems, grade the samples, and count the distinct correct reasoning paths.

`evaluate_arithmetic` is what the recipes print before and after training and what the benchmarks track over
training; `path_log_probs` gives the exact probability the model puts on each enumerated path of a problem, for
comparing a policy with a target distribution over paths.

Generation uses `transformers` `generate` with sampling, in batches, under a forked RNG seeded by `seed` (so an
evaluation does not move the caller's RNG and repeats exactly on the same machine). Not handled: vLLM, and several
processes (call it on one process, e.g. the main one, with the unwrapped model).
"""

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .arithmetic import ArithmeticProblem, boxed_accuracy_reward, enumerate_paths, path_id


@dataclass
class ArithmeticEvaluation:
    """Results of `evaluate_arithmetic`; per-problem lists are indexed [problem][sample]."""

    accuracy: float
    """avg@k: mean correctness over all samples of all problems."""
    pass_at_k: float
    """Share of problems with at least one correct sample among their k."""
    distinct_correct_paths: float
    """Mean over problems of the number of distinct valid paths among the correct samples."""
    path_entropy: float
    """Mean over problems with a correct valid sample of the entropy (nats) of their correct-path frequencies."""
    valid_path_rate: float
    """Share of samples that write a valid path (these are always correct)."""
    num_samples: int
    completions: list[list[str]] = field(repr=False)
    correct: list[list[bool]] = field(repr=False)
    path_ids: list[list[str | None]] = field(repr=False)

    def summary(self) -> str:
        return (
            f"accuracy {100 * self.accuracy:.1f}% (avg@{self.num_samples}), pass@{self.num_samples} "
            f"{100 * self.pass_at_k:.1f}%, distinct correct paths per problem {self.distinct_correct_paths:.2f}"
        )


def _prompt_texts(tokenizer, problems: Sequence[ArithmeticProblem]) -> list[str]:
    return [tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True) for p in problems]


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 512,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` sampled completions (decoded text, special tokens dropped) for each problem.

    The longest valid completion of the default task is 54 characters (55 tokens with the end-of-sequence token), so
    `max_new_tokens=64` never cuts a valid path; pass more for larger `max_value` or more terms.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    texts = [text for text in _prompt_texts(tokenizer, problems) for _ in range(num_samples)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                generated = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :]
                outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [outputs[i : i + num_samples] for i in range(0, len(outputs), num_samples)]


def grade_samples(
    problems: Sequence[ArithmeticProblem],
    completions: Sequence[Sequence[str]],
    reward_func: Callable[..., list[float]] = boxed_accuracy_reward,
) -> ArithmeticEvaluation:
    """Grade sampled completions with a TRL-style reward function and count distinct correct paths.

    `reward_func(completions=[[{"role": "assistant", "content": text}], ...], solution=[...])` must return one
    float per completion; a reward above 0.5 counts as correct (math-verify returns 1.0 or 0.0).
    """
    if len(problems) != len(completions) or not problems:
        raise ValueError(f"Need one list of completions per problem, got {len(completions)} for {len(problems)}.")
    num_samples = len(completions[0])
    if num_samples < 1 or any(len(samples) != num_samples for samples in completions):
        raise ValueError("Every problem needs the same number (at least one) of completions.")
    flat = [[{"role": "assistant", "content": text}] for samples in completions for text in samples]
    solutions = [p.solution for p, samples in zip(problems, completions) for _ in samples]
    rewards = reward_func(completions=flat, solution=solutions)
    correct, ids, cursor = [], [], 0
    for problem, samples in zip(problems, completions):
        correct.append([r > 0.5 for r in rewards[cursor : cursor + len(samples)]])
        ids.append([path_id(problem, text) for text in samples])
        cursor += len(samples)

    distinct, entropies = [], []
    for oks, pids in zip(correct, ids):
        counts = Counter(pid for ok, pid in zip(oks, pids) if ok and pid is not None)
        distinct.append(len(counts))
        if counts:
            total = sum(counts.values())
            entropies.append(-sum(c / total * math.log(c / total) for c in counts.values()))
    num_total = sum(len(oks) for oks in correct)
    return ArithmeticEvaluation(
        accuracy=sum(map(sum, correct)) / num_total,
        pass_at_k=sum(any(oks) for oks in correct) / len(correct),
        distinct_correct_paths=sum(distinct) / len(distinct),
        path_entropy=sum(entropies) / len(entropies) if entropies else 0.0,
        valid_path_rate=sum(pid is not None for pids in ids for pid in pids) / num_total,
        num_samples=num_samples,
        completions=[list(samples) for samples in completions],
        correct=correct,
        path_ids=ids,
    )


def evaluate_arithmetic(
    model,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 512,
    seed: int = 0,
    reward_func: Callable[..., list[float]] = boxed_accuracy_reward,
) -> ArithmeticEvaluation:
    """Sample `num_samples` completions per problem and grade them (see `sample_completions`, `grade_samples`).

    The defaults sample as TRL's GRPO does (temperature 1.0, no top-p or top-k). The model stays in the mode it
    was in; the caller's RNG is not advanced.
    """
    completions = sample_completions(
        model, tokenizer, problems, num_samples, temperature, top_p, max_new_tokens, batch_size, seed
    )
    return grade_samples(problems, completions, reward_func)


@torch.no_grad()
def path_log_probs(model, tokenizer, problem: ArithmeticProblem) -> dict[str, float]:
    """log pi(path | prompt) for every enumerated path of `problem`, end-of-sequence token included (temperature 1).

    Returns {path id: summed log-probability}; exp of the values sums to at most 1 (the rest of the mass is on
    invalid completions).
    """
    paths = enumerate_paths(problem)
    prompt = _prompt_texts(tokenizer, [problem])[0]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = [
        prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for text in paths.values()
    ]
    length = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([s + [pad] * (length - len(s)) for s in sequences], device=device)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences], device=device)
    was_training = model.training
    model.eval()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    model.train(was_training)
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    positions = torch.arange(1, length, device=device)[None, :]
    mask = (positions >= len(prompt_ids)) & attention_mask[:, 1:].bool()
    totals = (token_logps * mask).sum(dim=1)
    return dict(zip(paths.keys(), totals.tolist()))
