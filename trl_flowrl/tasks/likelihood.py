"""Exact probabilities of the arithmetic task's reasoning paths under a model, for comparing a policy with a target
distribution over paths (benchmark 4 and the path-probability tracking of benchmarks 2 and 3).

Sampling-based evaluation (accuracy, distinct correct paths) lives in `trl_flowrl.evaluation`.
"""

import torch

from .arithmetic import ArithmeticProblem, enumerate_paths


@torch.no_grad()
def path_log_probs(model, tokenizer, problem: ArithmeticProblem) -> dict[str, float]:
    """log pi(path | prompt) for every enumerated path of `problem`, end-of-sequence token included (temperature 1).

    Returns {path id: summed log-probability}; exp of the values sums to at most 1 (the rest of the mass is on
    invalid completions). One forward pass over all paths, right-padded; the model's train/eval mode is restored.
    """
    paths = enumerate_paths(problem)
    prompt = tokenizer.apply_chat_template(problem.prompt, tokenize=False, add_generation_prompt=True)
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
    # Position t of token_logps scores token t+1: keep the completion's tokens (and its end-of-sequence token).
    positions = torch.arange(1, length, device=device)[None, :]
    mask = (positions >= len(prompt_ids)) & attention_mask[:, 1:].bool()
    totals = (token_logps * mask).sum(dim=1)
    return dict(zip(paths.keys(), totals.tolist()))
