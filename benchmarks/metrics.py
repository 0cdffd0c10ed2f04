"""Pure functions the benchmarks of the embedded arithmetic task compute their figures with (no torch, no model).

- `path_distribution_distance`: how far a policy's distribution over a problem's enumerated correct paths is from the
  reference model's, which is FlowRL's target restricted to them; `mean_distance` averages it over problems;
- `rollouts_to_reach`: the rollouts at which an accuracy curve first reaches a threshold; `mean_curve`: the mean of
  runs' curves point by point;
- `question_counts`: the distinct questions a run trained on;
- `summarize`: mean, standard deviation and the per-seed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def path_distribution_distance(policy_logps: Mapping[str, float], reference_logps: Mapping[str, float]) -> dict:
    """How far a policy's distribution over a problem's valid paths is from the reference model's.

    Both arguments map each enumerated valid path of one problem to its summed log-probability (as
    `trl_flowrl.tasks.path_log_probs` returns them). All valid paths are correct and earn the same reward, so FlowRL's
    target `p*(y) ∝ π_ref(y) exp(β r(y))`, restricted to them, is the reference renormalised over them. With
    `q = π_θ / Σ π_θ` and `p = π_ref / Σ π_ref` over the paths:

    - `tv`: total variation `½ Σ |q - p|`, in [0, 1];
    - `kl`: `KL(q || p) = Σ q log(q / p)` (nats), the direction FlowRL minimises;
    - `kl_reverse`: `KL(p || q)` (nats), large when the policy drops paths the target keeps;
    - `policy_mass`, `reference_mass`: `Σ π` over the valid paths (the rest is on other completions);
    - `policy_entropy`, `reference_entropy`: entropies (nats) of `q` and `p`;
    - `policy_top`, `reference_top`: the largest probability of `q` and of `p` (1 for a collapsed distribution);
    - `policy_on_reference_top`: `q` of the reference's likeliest path (ties: the first path id in sorted order).

    Raises ValueError when the two do not hold the same paths or hold none.
    """
    if not policy_logps or set(policy_logps) != set(reference_logps):
        raise ValueError(
            "The policy and the reference must give log-probabilities for the same, non-empty set of paths; got "
            f"{sorted(policy_logps)} and {sorted(reference_logps)}."
        )
    keys = sorted(policy_logps)
    log_q_total = _log_sum_exp([policy_logps[k] for k in keys])
    log_p_total = _log_sum_exp([reference_logps[k] for k in keys])
    log_q = [policy_logps[k] - log_q_total for k in keys]
    log_p = [reference_logps[k] - log_p_total for k in keys]
    q = [math.exp(v) for v in log_q]
    p = [math.exp(v) for v in log_p]
    return {
        "tv": 0.5 * sum(abs(a - b) for a, b in zip(q, p)),
        "kl": sum(a * (la - lb) for a, la, lb in zip(q, log_q, log_p) if a > 0),
        "kl_reverse": sum(b * (lb - la) for b, la, lb in zip(p, log_q, log_p) if b > 0),
        "policy_mass": math.exp(log_q_total),
        "reference_mass": math.exp(log_p_total),
        "policy_entropy": -sum(a * la for a, la in zip(q, log_q) if a > 0),
        "reference_entropy": -sum(b * lb for b, lb in zip(p, log_p) if b > 0),
        "policy_top": max(q),
        "reference_top": max(p),
        "policy_on_reference_top": q[p.index(max(p))],
    }


def mean_distance(distances: Sequence[Mapping[str, float]]) -> dict:
    """The per-key mean of `path_distribution_distance` results over problems."""
    if not distances:
        raise ValueError("Need at least one problem's distances.")
    return {key: sum(d[key] for d in distances) / len(distances) for key in distances[0]}


def rollouts_to_reach(rollouts: Sequence[float], accuracies: Sequence[float], threshold: float) -> float | None:
    """Rollouts at which an accuracy curve first reaches `threshold`, interpolated linearly between the two
    evaluation points around the first crossing; the first point's rollouts if it is already there; None if never.

    `rollouts` must be increasing, with one accuracy per point.
    """
    if len(rollouts) != len(accuracies) or not rollouts:
        raise ValueError(f"Need one accuracy per point, got {len(rollouts)} points and {len(accuracies)} accuracies.")
    if any(b <= a for a, b in zip(rollouts, rollouts[1:])):
        raise ValueError("rollouts must be strictly increasing.")
    for i, accuracy in enumerate(accuracies):
        if accuracy >= threshold:
            if i == 0:
                return float(rollouts[0])
            x0, x1, y0, y1 = rollouts[i - 1], rollouts[i], accuracies[i - 1], accuracies[i]
            return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))
    return None


def mean_curve(curves: Sequence[Sequence[Mapping]], key: str) -> list[float]:
    """The mean over runs of `point[key]` at each evaluation point (runs must share their evaluation steps)."""
    steps = [[point["step"] for point in curve] for curve in curves]
    if not curves or any(s != steps[0] for s in steps):
        raise ValueError("The runs must have been evaluated at the same steps.")
    return [sum(curve[i][key] for curve in curves) / len(curves) for i in range(len(steps[0]))]


def question_counts(
    sampled: set[str], fresh: set[str] | None = None, replays: Mapping[str, int] | None = None
) -> dict:
    """Distinct questions a run trained on.

    `sampled`: the question ids the trainer received from its sampler. `fresh` and `replays`: what the trainer says it
    trained on, when it does (ExGRPO: fresh questions, and replays per question), which then decides
    `distinct_questions` (`source` "trainer"); otherwise the sampled ids do (`source` "sampler").
    """
    counts = {"distinct_questions_sampled": len(sampled)}
    if fresh is None:
        return {"distinct_questions": len(sampled), **counts, "source": "sampler"}
    replays = replays or {}
    return {
        "distinct_questions": len(set(fresh) | set(replays)),
        **counts,
        "distinct_fresh_questions": len(fresh),
        "distinct_replayed_questions": len(replays),
        "replays": sum(replays.values()),
        "max_replays_per_question": max(replays.values(), default=0),
        "source": "trainer",
    }


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and the values themselves."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": values}
