"""FlowRL's trajectory-balance loss against values worked out by hand.

The running example, B = 2 sequences, T = 3 positions, beta = 2:

    sequence 0: 3 tokens, log pi = (-1, -2, -3)   -> lp = -2;  log pi_ref = (-1.5, -2, -2.5) -> lp_ref = -2
                log Z = 0.5, r = 1     -> delta = 0.5 + (-2) - 2*1 - (-2)      = -1.5
    sequence 1: 2 tokens, log pi = (-0.5, -1.5) -> lp = -1;  log pi_ref = (-1, -1)       -> lp_ref = -1
                log Z = -0.2, r = -0.5 -> delta = -0.2 + (-1) - 2*(-0.5) - (-1) = 0.8

    on-policy (w = 1): loss = (1.5^2 + 0.8^2) / 2 = (2.25 + 0.64) / 2 = 1.445
"""

import math

import pytest
import torch

from trl_flowrl import trajectory_balance_loss
from trl_flowrl.flowrl import trajectory_balance_terms


def example(pad_value=0.0, **overrides):
    kwargs = dict(
        log_z=torch.tensor([0.5, -0.2], requires_grad=True),
        per_token_logps=torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, pad_value]], requires_grad=True),
        ref_per_token_logps=torch.tensor([[-1.5, -2.0, -2.5], [-1.0, -1.0, pad_value]]),
        old_per_token_logps=None,
        advantages=torch.tensor([1.0, -0.5]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        beta=2.0,
    )
    kwargs.update(overrides)
    return kwargs


def test_on_policy_value_by_hand():
    terms = trajectory_balance_terms(**example())
    assert torch.allclose(terms.residual, torch.tensor([-1.5, 0.8]))
    assert terms.loss.item() == pytest.approx(1.445, abs=1e-6)
    assert torch.equal(terms.weight, torch.ones(2))
    assert torch.allclose(terms.logp_gap, torch.tensor([0.0, 0.0]))
    assert trajectory_balance_loss(**example()).item() == pytest.approx(1.445, abs=1e-6)


def test_padding_positions_do_not_matter():
    assert trajectory_balance_loss(**example(pad_value=123.0)).item() == pytest.approx(1.445, abs=1e-6)


def test_gradients_reach_log_z_and_policy():
    kwargs = example()
    trajectory_balance_loss(**kwargs).backward()
    # d loss / d log Z_i = 2 w_i delta_i / B
    assert torch.allclose(kwargs["log_z"].grad, torch.tensor([2 * -1.5 / 2, 2 * 0.8 / 2]))
    # d loss / d log pi_t = 2 w_i delta_i / (B n_i) on the sequence's tokens, 0 on padding
    expected = torch.tensor([[-1.5 / 3] * 3, [0.8 / 2, 0.8 / 2, 0.0]])
    assert torch.allclose(kwargs["per_token_logps"].grad, expected)


@pytest.mark.parametrize(
    "clipping, weights",
    [
        ("clamp", [10.0, math.exp(-0.5)]),  # w0 = e^3 ~ 20.1 is clamped at 10
        ("symmetric", [1.2, 0.8]),  # both leave [0.8, 1.2]
        ("none", [math.exp(3.0), math.exp(-0.5)]),
    ],
)
def test_importance_weight_clipping_modes(clipping, weights):
    # old log-probs chosen so that sum_t (log pi - log pi_old) is 3 for sequence 0 and -0.5 for sequence 1 (the
    # padded position's difference of 7 must be ignored)
    old = torch.tensor([[-2.0, -3.0, -4.0], [-0.25, -1.25, -7.0]])
    terms = trajectory_balance_terms(
        **example(old_per_token_logps=old), clipping=clipping, weight_max=10.0, epsilon_low=0.2, epsilon_high=0.2
    )
    assert torch.allclose(terms.log_importance_weight, torch.tensor([3.0, -0.5]))
    assert torch.allclose(terms.weight, torch.tensor(weights), rtol=1e-5)
    expected = (weights[0] * 2.25 + weights[1] * 0.64) / 2
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)
    expected_clipped = {"clamp": [True, False], "symmetric": [True, True], "none": [False, False]}[clipping]
    assert terms.is_clipped.tolist() == expected_clipped


def test_weight_is_detached():
    old = torch.tensor([[-2.0, -3.0, -4.0], [-0.25, -1.25, 0.0]])
    kwargs = example(old_per_token_logps=old)
    trajectory_balance_terms(**kwargs, clipping="none").loss.backward()
    # With w treated as a constant, the gradient is w_i times the on-policy one
    w = torch.tensor([math.exp(3.0), math.exp(-0.5)])
    expected = torch.tensor([[-1.5 / 3] * 3, [0.8 / 2, 0.8 / 2, 0.0]]) * w[:, None]
    assert torch.allclose(kwargs["per_token_logps"].grad, expected, rtol=1e-5)


def test_empty_completion_contributes_nothing_but_counts_in_the_mean():
    terms = trajectory_balance_terms(**example(completion_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])))
    assert terms.included.tolist() == [True, False]
    assert terms.loss.item() == pytest.approx(2.25 / 2, abs=1e-6)


def test_group_with_all_equal_rewards_still_trains_log_z_toward_the_reference():
    # All-equal rewards give zero advantages: delta = log Z + lp - lp_ref, which pulls log Z and the policy together
    kwargs = example(advantages=torch.zeros(2))
    kwargs["per_token_logps"] = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]], requires_grad=True)
    terms = trajectory_balance_terms(**kwargs)
    assert torch.allclose(terms.residual, torch.tensor([0.5 + -1.0 - -2.0, -0.2 + -2.0 - -1.0]))
    terms.loss.backward()
    assert torch.allclose(kwargs["log_z"].grad, terms.residual)  # 2 * delta / B with B = 2
    assert kwargs["per_token_logps"].grad.abs().sum() > 0


def test_unscorable_sequence_is_excluded_without_nan():
    kwargs = example(advantages=torch.tensor([1.0, float("nan")]), sequence_mask=torch.tensor([True, False]))
    terms = trajectory_balance_terms(**kwargs)
    assert terms.loss.item() == pytest.approx(2.25 / 2, abs=1e-6)
    terms.loss.backward()
    assert torch.isfinite(kwargs["log_z"].grad).all() and kwargs["log_z"].grad[1] == 0
    assert torch.isfinite(kwargs["per_token_logps"].grad).all()


def test_sampling_ratio_multiplies_after_clipping():
    old = torch.tensor([[-2.0, -3.0, -4.0], [-0.25, -1.25, 0.0]])
    terms = trajectory_balance_terms(
        **example(old_per_token_logps=old), clipping="clamp", weight_max=10.0, sampling_ratio=torch.tensor([0.5, 2.0])
    )
    assert torch.allclose(terms.weight, torch.tensor([10.0 * 0.5, math.exp(-0.5) * 2.0]))


def test_gradient_accumulation_halves_average_to_the_full_batch():
    # The trainer divides each micro-batch's loss by the number of accumulation steps: with equal micro-batches, the
    # accumulated gradient is the full batch's.
    full = example()
    trajectory_balance_loss(**full).backward()
    halves = example()
    for i in range(2):
        part = {
            k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v)
            for k, v in halves.items()
            if k != "old_per_token_logps"
        }
        (trajectory_balance_loss(**part, old_per_token_logps=None) / 2).backward()
    assert torch.allclose(full["log_z"].grad, halves["log_z"].grad)
    assert torch.allclose(full["per_token_logps"].grad, halves["per_token_logps"].grad)


def test_large_unclipped_weight_stays_finite():
    old = torch.full((2, 3), -100.0)  # log w = sum of ~+98 per token: far beyond float32's exp range
    terms = trajectory_balance_terms(**example(old_per_token_logps=old), clipping="none")
    assert torch.isfinite(terms.loss)


def test_unknown_clipping_mode_is_refused():
    with pytest.raises(ValueError, match="clipping must be"):
        trajectory_balance_loss(**example(), clipping="soft")
