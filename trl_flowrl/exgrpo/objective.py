"""ExGRPO's mixed-policy objective, as pure functions of tensors.

A batch holds B completions padded to T positions. Each row is either *fresh* (sampled by the current policy's
generation step) or *replayed* (a stored trajectory from the buffer). With A_i the row's advantage (TRL's, over the
whole mixed group: `reward - group mean` by default), the per-token loss is

    fresh token:     r = π_θ / π_old                (π_old: the policy that sampled the batch)
                     -min(r · A, clip(r, 1 - ε_low, 1 + ε_high) · A)    (clipped, as GRPO)
                     -r · A                                              (unclipped: after the switch, official code)
                     then multiplied by TRL's vLLM importance-sampling ratio when there is one
    replayed token:  w = π_θ / π_stored             (π_stored: the policy that generated the stored trajectory)
                     -f(w) · A,  f(w) = w / (w + s)  with s = 0.1, no clipping, no vLLM ratio

plus, when β != 0, β times TRL's k3 estimate of KL(π_θ || π_ref) on every token (optionally multiplied by the
token's importance weight, r or w, as TRL's `use_bias_correction_kl`). Gradient of a replayed token's loss w.r.t. its
log-prob: -f'(w) · w · A = -s · w / (w + s)² · A, which vanishes for w → 0 and w → ∞ (the shaping keeps
low-probability replayed tokens from dominating and stops very likely ones from being pushed further).

`f(w)` is evaluated as `sigmoid(log w - log s)`, which is the same function without overflow for large w.

Not handled here: the entropy bonus and the MoE auxiliary loss (added by the trainer as TRL does), and sequence-level
importance sampling (refused by the config).
"""

import math

import torch


def exgrpo_per_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    stored_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    replay_mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    clip_fresh: bool = True,
    shaping: float | None = 0.1,
    importance_sampling_ratio: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token ExGRPO loss (before masking and aggregation).

    Args:
        per_token_logps: (B, T) log π_θ of the completion tokens, differentiable.
        old_per_token_logps: (B, T) log π_old (the sampling policy) for fresh rows; ignored on replayed rows.
        stored_per_token_logps: (B, T) log π_stored for replayed rows; ignored on fresh rows.
        advantages: (B,) or (B, 1).
        replay_mask: (B,) bool, True on replayed rows.
        epsilon_low, epsilon_high: clipping range of fresh tokens when `clip_fresh`.
        clip_fresh: whether fresh tokens are clipped.
        shaping: s in f(w) = w / (w + s), > 0; `None` uses the plain, unclipped ratio w (no policy shaping, the
            paper's ablation).
        importance_sampling_ratio: (B, T) or (B, 1) vLLM correction, applied to fresh rows only.
        ref_per_token_logps: (B, T) log π_ref, needed when beta != 0.
        beta: KL coefficient.
        kl_bias_correction: multiply the KL term by the token's importance weight, r on fresh rows and w on replayed
            ones (unbounded, as TRL's r).

    Returns:
        per_token_loss (B, T); ratio (B, T) r = π_θ / π_old (1 on replayed rows); shaped_weight (B, T) f(w) (f(1) on
        fresh rows); per_token_kl (B, T) or None. Only the loss carries gradients. Padding positions are not masked:
        the caller aggregates with the mask.
    """
    if shaping is not None and shaping <= 0:
        raise ValueError(f"shaping must be > 0 or None, got {shaping}.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    replayed = replay_mask.bool().unsqueeze(1)  # (B, 1)

    # Each branch only sees its own rows (zeros elsewhere): torch.where passes a zero gradient to the branch it does
    # not select, and zero times an overflowed exp() in that branch would be NaN.
    log_ratio = torch.where(replayed, 0.0, per_token_logps - old_per_token_logps)
    ratio = torch.exp(log_ratio)
    if clip_fresh:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        fresh_loss = -torch.min(ratio * advantages, clipped * advantages)
    else:
        fresh_loss = -ratio * advantages
    if importance_sampling_ratio is not None:
        fresh_loss = fresh_loss * importance_sampling_ratio

    log_w = torch.where(replayed, per_token_logps - stored_per_token_logps, 0.0)
    if shaping is None:
        shaped_weight = torch.exp(log_w)
    else:
        shaped_weight = torch.sigmoid(log_w - math.log(shaping))  # = w / (w + s)
    replay_loss = -shaped_weight * advantages

    per_token_loss = torch.where(replayed, replay_loss, fresh_loss)

    per_token_kl = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps.")
        delta = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(delta) - delta - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * torch.where(replayed, torch.exp(log_w), ratio)
        per_token_loss = per_token_loss + beta * per_token_kl

    return per_token_loss, ratio.detach(), shaped_weight.detach(), per_token_kl


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the (B, T) 0/1 `mask`, the way TRL's loss types do.

    - `"grpo"`: mean over rows of the row's token mean.
    - `"bnpo"`: token sum / number of tokens in this batch.
    - `"dr_grpo"`: token sum / (B · `max_completion_length`).
    - `"dapo"`: token sum / `num_items` (the caller passes TRL's normaliser: the tokens of the generation batch
      over all processes, rescaled to one micro-batch).

    Gradient accumulation is not divided here (TRL divides all but `"dapo"` by it afterwards).
    """
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        if num_items is None:
            raise ValueError("loss_type='dapo' needs num_items.")
        return masked.sum() / num_items
    raise ValueError(f"Unsupported loss_type {loss_type!r}: expected 'grpo', 'bnpo', 'dr_grpo' or 'dapo'.")
