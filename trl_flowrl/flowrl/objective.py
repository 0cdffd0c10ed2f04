"""FlowRL's trajectory-balance objective, as pure functions of tensors.

For prompt x and sampled completion y_i (B sequences in the batch, T completion positions, n_i completion tokens):

    g_i  = log π_θ(y_i|x) − log π_ref(y_i|x), summed over the tokens ("sum", "length") or their mean ("token_mean")
    δ_i  = log Z(x) + g_i − β · r_i                                  (the residual)
           divided by n_i as a whole for "length"
    w_i  = exp(Σ_t [log π_θ(y_t) − log π_old(y_t)]), detached         (sequence importance weight, then clipped)
    loss = (1/B) · Σ_i clip(w_i) · ρ_i · δ_i²

r_i is the reward term (the group-normalised advantage or the raw reward); ρ_i an optional extra correction (TRL's vLLM
importance-sampling ratio, per sequence); log Z(x) comes from the log Z head or from the group itself
(`group_log_z`).

What each normalisation does (the target is p*(y|x) ∝ π_ref(y|x) · exp(β · r(x, y))):

- `"token_mean"` (the official code): g_i is a mean over tokens while β · r_i is not divided, so the residual is zero
  where log π_θ − log π_ref = n_i · (β r_i − log Z): the fixed point is π_ref · exp(β · n_i · r), which for completions
  longer than one token is much sharper than p* (near an argmax for long ones). With the advantage as r_i, the
  per-sample gradient is 2β · [−A_i + (g_i + log Z) / β] · ∇ mean_t log π_θ: GRPO's sequence-mean gradient plus a
  squared log-ratio pull toward π_ref of weight about 1/β. It matches p* only for one-token completions.
- `"sum"` (the matching preset): exact trajectory balance. δ_i = 0 for every y exactly when π_θ = p* and log Z is its
  log-partition; the expected gradient with that log Z is twice the gradient of KL(π_θ || p*). Gradients grow with the
  length (far above a `max_grad_norm` of 1), so with gradient clipping every optimiser step has the same norm.
- `"length"`: the "sum" residual divided by n_i. Same zero set, hence the same fixed point, but each token's gradient
  is 2 w_i δ_i / n_i², about n² smaller: below the clipping threshold, and it matched p* more slowly on the
  enumerable toy of `benchmarks/bench_matching_toy.py` (see `FlowRLConfig.residual_normalization`).

Deliberate choices, following the maintained official code:
- w is a *product* of token ratios (a sum of log-ratios) whatever the normalisation of δ; with `"token_mean"` this is
  the official code's mismatch.
- Every sequence weighs the same in the mean, whatever its length (before the `"length"` division).
- A sequence with no completion token left (all masked, e.g. by `mask_truncated_completions`) or excluded by
  `sequence_mask` (e.g. unscorable: every reward function returned None) contributes nothing; it still counts in B,
  as masked sequences do in GRPO's loss. A completion that is only an EOS token has one token and trains normally.
"""

import math
from dataclasses import dataclass

import torch


# exp(80) is about 5.5e34: large enough never to matter as a weight, small enough to stay finite in float32.
_MAX_LOG_WEIGHT = 80.0

NORMALIZATIONS = ("token_mean", "sum", "length")
CLIPPINGS = ("clamp", "symmetric", "none")


@dataclass
class TrajectoryBalanceTerms:
    """The loss and the per-sequence quantities it is built from (all (B,) tensors detached except `loss`)."""

    loss: torch.Tensor  # scalar, differentiable w.r.t. log_z (when given) and per_token_logps
    residual: torch.Tensor  # δ_i (divided by n_i for "length")
    weight: torch.Tensor  # the weight applied to δ_i²: clip(w_i) · ρ_i
    log_importance_weight: torch.Tensor  # log w_i before clipping
    is_clipped: torch.Tensor  # bool: clipping changed w_i
    logp_gap: torch.Tensor  # g_i: log π_θ − log π_ref, summed or token-mean as the normalisation says
    log_z: torch.Tensor  # log Z(x) used for each sequence (the head's output, or the group estimate)
    included: torch.Tensor  # bool: the sequence contributes to the loss


def _log_ratio_term(per_token_logps, ref_per_token_logps, mask, normalization):
    """g_i: (B,) summed (or token-mean) log π − log π_ref over the masked tokens."""
    total = ((per_token_logps.float() - ref_per_token_logps.float()) * mask).sum(dim=-1)
    if normalization == "token_mean":
        return total / mask.sum(dim=-1).clamp(min=1.0)
    return total


def group_log_z(
    logp_gap: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    group_index: torch.Tensor,
    included: torch.Tensor,
) -> torch.Tensor:
    """Per-group estimate of log Z(x), VarGrad style (Richter et al., 2020): no parameters, nothing to train.

        log Ẑ(x) = mean over the group's included sequences j of (β · r_j − g_j)

    which is the value of log Z that zeroes the group's mean residual. When π_θ = p*, β · r − g is the same for every
    completion (it is log Z), so every residual is exactly zero. Returned detached: it is an estimate, not a parameter,
    and with equal sequence weights its gradient would cancel anyway.

    Args:
        logp_gap: (B,) g_j, in the normalisation the residual uses.
        rewards: (B,) r_j, the reward term of the residual.
        beta: reward scale β.
        group_index: (B,) integer id of each sequence's group (prompt); ids need not be contiguous.
        included: (B,) bool, False leaves a sequence out of the mean (NaN rewards, empty completions).

    Returns:
        (B,) the estimate of each sequence's group, 0 for a group with no included sequence.
    """
    values = (beta * rewards.float() - logp_gap.float()).detach()
    values = torch.where(included, values, torch.zeros_like(values))
    _, groups = torch.unique(group_index, return_inverse=True)
    num_groups = int(groups.max().item()) + 1 if groups.numel() else 0
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, included.float())
    return (sums / counts.clamp(min=1.0))[groups]


def trajectory_balance_terms(
    *,
    log_z: torch.Tensor | None,
    per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    normalization: str = "token_mean",
    clipping: str = "clamp",
    weight_max: float = 10.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    sampling_ratio: torch.Tensor | None = None,
    sequence_mask: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
) -> TrajectoryBalanceTerms:
    """Compute FlowRL's trajectory-balance loss and its per-sequence terms (see the module docstring for the formula).

    Args:
        log_z: (B,) log Z(x) of each sequence's prompt (the log Z head's output, or a precomputed group estimate), or
            `None` to estimate it from the batch itself with `group_log_z` (needs `group_index`, and every group whole
            in the batch).
        per_token_logps: (B, T) log π_θ of the completion tokens (differentiable).
        ref_per_token_logps: (B, T) log π_ref of the same tokens.
        old_per_token_logps: (B, T) log π_old, the policy that sampled the batch; `None` means on-policy (w = 1).
        advantages: (B,) r_i, the reward term of the residual (the advantage or the raw reward).
        completion_mask: (B, T) 1 for completion tokens that count, 0 for padding.
        beta: reward scale β of the target distribution.
        normalization: "token_mean" (official), "sum" or "length"; see the module docstring.
        clipping: "clamp" (min(w, weight_max)), "symmetric" ([1 - epsilon_low, 1 + epsilon_high]) or "none".
        weight_max: upper bound of w for "clamp".
        epsilon_low, epsilon_high: bounds for "symmetric".
        sampling_ratio: (B,) optional extra per-sequence weight, applied after clipping (detached).
        sequence_mask: (B,) optional bool, False excludes a sequence from the loss.
        group_index: (B,) integer group (prompt) id of each sequence, for `log_z=None`.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be 'clamp', 'symmetric' or 'none', got {clipping!r}")
    mask = completion_mask.to(torch.float32)
    num_tokens = mask.sum(dim=-1)
    included = num_tokens > 0
    if sequence_mask is not None:
        included = included & sequence_mask.bool()

    gap = _log_ratio_term(per_token_logps, ref_per_token_logps, mask, normalization)
    rewards = torch.where(included, advantages.float(), torch.zeros_like(advantages, dtype=torch.float32))
    if log_z is None:
        if group_index is None:
            raise ValueError("log_z=None estimates log Z from each group: pass group_index.")
        log_z = group_log_z(gap, rewards, beta, group_index, included)
    residual = log_z.float() + gap - beta * rewards
    if normalization == "length":
        residual = residual / num_tokens.clamp(min=1.0)

    with torch.no_grad():
        if old_per_token_logps is None:
            log_weight = torch.zeros_like(gap)
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
        logp_gap=gap.detach(),
        log_z=log_z.detach().float(),
        included=included,
    )


def trajectory_balance_loss(**kwargs) -> torch.Tensor:
    """FlowRL's loss, `(1/B) Σ_i clip(w_i) · δ_i²`, as a differentiable scalar.

    Shapes: `log_z` (B,) or None, `per_token_logps`, `ref_per_token_logps`, `old_per_token_logps` (B, T),
    `advantages` (B,), `completion_mask` (B, T); `sampling_ratio`, `sequence_mask` and `group_index` (B,). Takes the
    keyword arguments of `trajectory_balance_terms`; see the module docstring for the formula.
    """
    return trajectory_balance_terms(**kwargs).loss
