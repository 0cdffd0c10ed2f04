"""ExGRPO's mixed objective against values worked out by hand."""

import math

import pytest
import torch

from trl_flowrl.exgrpo import aggregate_loss, exgrpo_per_token_loss


LOG = math.log


def loss_of(logp, old=0.0, stored=0.0, advantage=1.0, replayed=False, **kwargs):
    """Per-token loss of a single one-token row."""
    per_token_loss, _, _, _ = exgrpo_per_token_loss(
        torch.tensor([[logp]]),
        torch.tensor([[old]]),
        torch.tensor([[stored]]),
        torch.tensor([advantage]),
        torch.tensor([replayed]),
        **kwargs,
    )
    return per_token_loss.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected"),
    [
        (1.5, 1.0, -1.2),  # -min(1.5, 1.2)
        (1.5, -1.0, 1.5),  # -min(-1.5, -1.2)
        (0.5, 1.0, -0.5),  # -min(0.5, 0.8)
        (0.5, -1.0, 0.8),  # -min(-0.5, -0.8)
        (1.1, 2.0, -2.2),  # inside the range: -r * A
    ],
)
def test_fresh_tokens_are_clipped_like_grpo(ratio, advantage, expected):
    assert loss_of(LOG(ratio), advantage=advantage, clip_fresh=True) == pytest.approx(expected)


@pytest.mark.parametrize(("ratio", "advantage"), [(1.5, 1.0), (1.5, -1.0), (0.5, 1.0), (0.5, -1.0)])
def test_fresh_tokens_unclipped_after_the_switch(ratio, advantage):
    assert loss_of(LOG(ratio), advantage=advantage, clip_fresh=False) == pytest.approx(-ratio * advantage)


def test_asymmetric_clip_range():
    # r = 1.5, epsilon_high = 0.28 -> clipped to 1.28
    assert loss_of(LOG(1.5), clip_fresh=True, epsilon_low=0.2, epsilon_high=0.28) == pytest.approx(-1.28)


@pytest.mark.parametrize(
    ("w", "advantage", "expected"),
    [
        (0.3, 2.0, -1.5),  # f = 0.3 / 0.4 = 0.75
        (1.0, 1.0, -1.0 / 1.1),
        (5.0, -1.0, 5.0 / 5.1),  # no clipping however far w is from 1
        (0.01, 1.0, -0.01 / 0.11),
    ],
)
def test_replayed_tokens_use_the_shaped_weight_without_clipping(w, advantage, expected):
    # logp - stored = log w; `old` is irrelevant on replayed rows
    got = loss_of(LOG(w) - 2.0, old=5.0, stored=-2.0, advantage=advantage, replayed=True, clip_fresh=True)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("w", [0.3, 1.0, 5.0])
def test_without_policy_shaping_replayed_tokens_use_the_plain_ratio(w):
    assert loss_of(LOG(w), replayed=True, shaping=None, advantage=2.0) == pytest.approx(-2.0 * w)


def test_shaping_constant():
    # s = 0.5, w = 1.5 -> f = 1.5 / 2.0 = 0.75
    assert loss_of(LOG(1.5), replayed=True, shaping=0.5) == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="shaping"):
        loss_of(0.0, replayed=True, shaping=0.0)


def test_large_weights_stay_finite():
    logp = torch.tensor([[200.0]], requires_grad=True)
    per_token_loss, _, shaped, _ = exgrpo_per_token_loss(
        logp, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1.0]), torch.tensor([True])
    )
    per_token_loss.sum().backward()
    assert per_token_loss.item() == -1.0 and shaped.item() == 1.0
    assert torch.isfinite(logp.grad).all()


def test_mixed_batch_applies_shaping_only_to_replayed_rows_and_vllm_ratio_only_to_fresh_rows():
    # Row 0 fresh (r = 1.5, A = 1, unclipped), row 1 replayed (w = 0.3, A = 2), both with an IS ratio of 0.5.
    logps = torch.tensor([[LOG(1.5), 0.0], [LOG(0.3) - 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0], [9.0, 9.0]])
    stored = torch.tensor([[7.0, 7.0], [-1.0, 0.0]])
    per_token_loss, ratio, shaped, kl = exgrpo_per_token_loss(
        logps,
        old,
        stored,
        torch.tensor([1.0, 2.0]),
        torch.tensor([False, True]),
        clip_fresh=False,
        importance_sampling_ratio=torch.full((2, 2), 0.5),
    )
    assert kl is None
    assert per_token_loss[0].tolist() == pytest.approx([-1.5 * 0.5, -1.0 * 0.5])
    assert per_token_loss[1].tolist() == pytest.approx([-0.75 * 2, -(1 / 1.1) * 2])
    assert shaped[1].tolist() == pytest.approx([0.75, 1 / 1.1])
    assert ratio[0].tolist() == pytest.approx([1.5, 1.0])


def test_kl_term_and_its_bias_correction():
    # logp = log 0.5, ref = log 0.25: delta = log 0.5, k3 = 0.5 - log 0.5 - 1 = 0.1931472
    k3 = 0.5 - LOG(0.5) - 1
    logps = torch.full((2, 1), LOG(0.5))
    ref = torch.full((2, 1), LOG(0.25))
    old = torch.tensor([[LOG(0.25)], [0.0]])  # fresh r = 2
    stored = torch.tensor([[0.0], [LOG(2.0)]])  # replayed w = 0.25
    args = (logps, old, stored, torch.zeros(2), torch.tensor([False, True]))
    loss, _, _, kl = exgrpo_per_token_loss(*args, ref_per_token_logps=ref, beta=0.1)
    assert kl.flatten().tolist() == pytest.approx([k3, k3])
    assert loss.flatten().tolist() == pytest.approx([0.1 * k3, 0.1 * k3])  # A = 0: only the KL term is left
    loss, _, _, kl = exgrpo_per_token_loss(*args, ref_per_token_logps=ref, beta=0.1, kl_bias_correction=True)
    assert kl.flatten().tolist() == pytest.approx([2 * k3, 0.25 * k3])
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        exgrpo_per_token_loss(*args, beta=0.1)


def test_aggregations_with_padding():
    per_token_loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # grpo: mean of row means = (2 + 4) / 2; bnpo: 10 / 4 tokens; dr_grpo: 10 / (2 rows * 8); dapo: 10 / 5
    assert aggregate_loss(per_token_loss, mask, "grpo").item() == pytest.approx(3.0)
    assert aggregate_loss(per_token_loss, mask, "bnpo").item() == pytest.approx(2.5)
    assert aggregate_loss(per_token_loss, mask, "dr_grpo", max_completion_length=8).item() == pytest.approx(0.625)
    assert aggregate_loss(per_token_loss, mask, "dapo", num_items=torch.tensor(5.0)).item() == pytest.approx(2.0)


def test_aggregation_of_an_all_padding_row_and_bad_arguments():
    per_token_loss = torch.tensor([[3.0, 1.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert aggregate_loss(per_token_loss, mask, "grpo").item() == pytest.approx(1.0)  # (2 + 0) / 2
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(per_token_loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="num_items"):
        aggregate_loss(per_token_loss, mask, "dapo")
    with pytest.raises(ValueError, match="Unsupported loss_type"):
        aggregate_loss(per_token_loss, mask, "cispo")


def test_gradient_of_a_replayed_token_is_minus_f_prime_w_times_w_times_a_over_the_normaliser():
    # w = 0.3, s = 0.1, A = 2, dr_grpo with B = 2 rows and max_completion_length = 4: normaliser 8.
    # d/dlogp [-f(w) A] = -f'(w) w A = -s w / (w + s)^2 * A = -0.1 * 0.3 / 0.16 * 2 = -0.375 -> / 8 = -0.046875
    logps = torch.tensor([[LOG(0.3), -1.0], [-0.5, -0.5]], requires_grad=True)
    stored = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    per_token_loss, _, _, _ = exgrpo_per_token_loss(
        logps, logps.detach(), stored, torch.tensor([2.0, -1.0]), torch.tensor([True, False]), clip_fresh=False
    )
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    aggregate_loss(per_token_loss, mask, "dr_grpo", max_completion_length=4).backward()
    assert logps.grad[0, 0].item() == pytest.approx(-0.375 / 8)
    assert logps.grad[0, 1].item() == 0.0  # padding
    # A fresh token at ratio 1: d/dlogp [-r A] = -A -> 1 / 8
    assert logps.grad[1].tolist() == pytest.approx([1 / 8, 1 / 8])


def test_clipped_fresh_token_has_no_gradient():
    logps = torch.tensor([[LOG(1.5)]], requires_grad=True)
    per_token_loss, _, _, _ = exgrpo_per_token_loss(
        logps, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1.0]), torch.tensor([False]), clip_fresh=True
    )
    per_token_loss.sum().backward()
    assert logps.grad.item() == 0.0
