"""FlowRL's trajectory-balance objective, as pure functions of tensors.

For prompt x and sampled completion y_i (B sequences in the batch, T completion positions):

    lp_i     = mean over completion tokens of log π_θ(y_t | x, y_<t)                   (length-normalised)
    lp_ref_i = mean over completion tokens of log π_ref(y_t | x, y_<t)
    δ_i      = log Z(x) + lp_i − β · r_i − lp_ref_i                                    (the residual)
    w_i      = exp(Σ_t [log π_θ(y_t) − log π_old(y_t)]), detached                      (sequence importance weight)
    loss     = (1/B) · Σ_i clip(w_i) · ρ_i · δ_i²

r_i is the group-normalised reward (the GRPO advantage) or the raw reward; ρ_i is an optional extra correction
(TRL's vLLM importance-sampling ratio, per sequence). Minimising it is, in expected gradient, the reverse KL between
π_θ and p*(y|x) ∝ π_ref(y|x) · exp(β · r(x, y)).

Deliberate choices, following the maintained official code:
- δ uses token *means* (which keeps long chains of thought from exploding gradients), while w is a *product* of token
  ratios (a sum of log-ratios). The mismatch is in the official code too.
- Every sequence weighs the same in the mean, whatever its length.
- A sequence with no completion token left (all masked, e.g. by `mask_truncated_completions`) or excluded by
  `sequence_mask` (e.g. unscorable: every reward function returned None) contributes nothing; it still counts in B,
  as masked sequences do in GRPO's loss. A completion that is only an EOS token has one token and trains normally.
"""

import math
from dataclasses import dataclass

import torch


# exp(80) is about 5.5e34: large enough never to matter as a weight, small enough to stay finite in float32.
_MAX_LOG_WEIGHT = 80.0


@dataclass
class TrajectoryBalanceTerms:
    """The loss and the per-sequence quantities it is built from (all (B,) tensors detached except `loss`)."""

    loss: torch.Tensor  # scalar, differentiable w.r.t. log_z and per_token_logps
    residual: torch.Tensor  # δ_i
    weight: torch.Tensor  # the weight applied to δ_i²: clip(w_i) · ρ_i
    log_importance_weight: torch.Tensor  # log w_i before clipping
    is_clipped: torch.Tensor  # bool: clipping changed w_i
    logp_gap: torch.Tensor  # lp_i − lp_ref_i
    included: torch.Tensor  # bool: the sequence contributes to the loss


def trajectory_balance_terms(
    *,
    log_z: torch.Tensor,
    per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    clipping: str = "clamp",
    weight_max: float = 10.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    sampling_ratio: torch.Tensor | None = None,
    sequence_mask: torch.Tensor | None = None,
) -> TrajectoryBalanceTerms:
    """Compute FlowRL's trajectory-balance loss and its per-sequence terms (see the module docstring for the formula).

    Args:
        log_z: (B,) log Z(x) of each sequence's prompt, from the log Z head.
        per_token_logps: (B, T) log π_θ of the completion tokens (differentiable).
        ref_per_token_logps: (B, T) log π_ref of the same tokens.
        old_per_token_logps: (B, T) log π_old, the policy that sampled the batch; `None` means on-policy (w = 1).
        advantages: (B,) r_i, the reward term of the residual.
        completion_mask: (B, T) 1 for completion tokens that count, 0 for padding.
        beta: reward scale β of the target distribution.
        clipping: "clamp" (min(w, weight_max)), "symmetric" ([1 - epsilon_low, 1 + epsilon_high]) or "none".
        weight_max: upper bound of w for "clamp".
        epsilon_low, epsilon_high: bounds for "symmetric".
        sampling_ratio: (B,) optional extra per-sequence weight, applied after clipping (detached).
        sequence_mask: (B,) optional bool, False excludes a sequence from the loss.
    """
    if clipping not in ("clamp", "symmetric", "none"):
        raise ValueError(f"clipping must be 'clamp', 'symmetric' or 'none', got {clipping!r}")
    mask = completion_mask.to(torch.float32)
    num_tokens = mask.sum(dim=-1)
    included = num_tokens > 0
    if sequence_mask is not None:
        included = included & sequence_mask.bool()
    denominator = num_tokens.clamp(min=1.0)

    logp = (per_token_logps.float() * mask).sum(dim=-1) / denominator
    ref_logp = (ref_per_token_logps.float() * mask).sum(dim=-1) / denominator
    rewards = torch.where(included, advantages.float(), torch.zeros_like(advantages, dtype=torch.float32))
    residual = log_z.float() + logp - beta * rewards - ref_logp

    with torch.no_grad():
        if old_per_token_logps is None:
            log_weight = torch.zeros_like(logp)
        else:
            log_weight = ((per_token_logps.detach().float() - old_per_token_logps.float()) * mask).sum(dim=-1)
        raw_weight = torch.exp(log_weight.clamp(max=_MAX_LOG_WEIGHT))
        if clipping == "clamp":
            weight = raw_weight.clamp(max=weight_max)
            is_clipped = log_weight > math.log(weight_max)
        elif clipping == "symmetric":
            weight = raw_weight.clamp(min=1.0 - epsilon_low, max=1.0 + epsilon_high)
            is_clipped = (raw_weight < 1.0 - epsilon_low) | (raw_weight > 1.0 + epsilon_high)
        else:
            weight = raw_weight
            is_clipped = log_weight > _MAX_LOG_WEIGHT
        if sampling_ratio is not None:
            weight = weight * sampling_ratio.float()
        weight = torch.where(included, weight, torch.zeros_like(weight))

    # Excluded sequences may carry NaN (an unscorable reward); where() keeps them out of the sum and its gradient.
    per_sequence = torch.where(included, weight * residual.pow(2), torch.zeros_like(residual))
    loss = per_sequence.sum() / residual.numel()
    return TrajectoryBalanceTerms(
        loss=loss,
        residual=residual.detach(),
        weight=weight,
        log_importance_weight=log_weight,
        is_clipped=is_clipped & included,
        logp_gap=(logp - ref_logp).detach(),
        included=included,
    )


def trajectory_balance_loss(
    *,
    log_z: torch.Tensor,
    per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    clipping: str = "clamp",
    weight_max: float = 10.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    sampling_ratio: torch.Tensor | None = None,
    sequence_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlowRL's loss, `(1/B) Σ_i clip(w_i) · δ_i²`, as a differentiable scalar.

    Shapes: `log_z` (B,), `per_token_logps`, `ref_per_token_logps`, `old_per_token_logps` (B, T), `advantages` (B,),
    `completion_mask` (B, T); `sampling_ratio` and `sequence_mask` (B,). See `trajectory_balance_terms` for the
    arguments and the module docstring for the formula.
    """
    return trajectory_balance_terms(
        log_z=log_z,
        per_token_logps=per_token_logps,
        ref_per_token_logps=ref_per_token_logps,
        old_per_token_logps=old_per_token_logps,
        advantages=advantages,
        completion_mask=completion_mask,
        beta=beta,
        clipping=clipping,
        weight_max=weight_max,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        sampling_ratio=sampling_ratio,
        sequence_mask=sequence_mask,
    ).loss
