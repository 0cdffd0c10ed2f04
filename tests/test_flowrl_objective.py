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


# -- the normalisations and the log Z estimates ---------------------------------------------------------------------
#
# A second example, with log-ratios that differ between the sequences (beta = 2, log Z = (0.5, -0.2), r = (1, -0.5)):
#
#     sequence 0: 3 tokens, log pi = (-1, -2, -3), log pi_ref = (-1, -1, -1): gap sum -3, gap mean -1
#     sequence 1: 2 tokens, log pi = (-0.5, -1.5), log pi_ref = (-1, -2):     gap sum  1, gap mean 0.5
#
#     token_mean: delta = (0.5 - 1 - 2, -0.2 + 0.5 + 1) = (-2.5, 1.3)       loss = (6.25 + 1.69) / 2 = 3.97
#     sum:        delta = (0.5 - 3 - 2, -0.2 + 1 + 1)   = (-4.5, 1.8)       loss = (20.25 + 3.24) / 2 = 11.745
#     length:     delta = (-4.5 / 3, 1.8 / 2)            = (-1.5, 0.9)       loss = (2.25 + 0.81) / 2 = 1.53
#
# The group estimate of log Z, one group: mean of beta * r - gap sum = mean(2 + 3, -1 - 1) = 1.5, so
#     sum:    delta = (1.5 - 3 - 2, 1.5 + 1 + 1) = (-3.5, 3.5)               loss = 12.25
#     length: delta = (-3.5 / 3, 3.5 / 2)                                    loss = ((3.5/3)^2 + 1.75^2) / 2


def gaps_example(**overrides):
    kwargs = dict(
        log_z=torch.tensor([0.5, -0.2], requires_grad=True),
        per_token_logps=torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True),
        ref_per_token_logps=torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]]),
        old_per_token_logps=None,
        advantages=torch.tensor([1.0, -0.5]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        beta=2.0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    "normalization, residual, loss, gap",
    [
        ("token_mean", [-2.5, 1.3], 3.97, [-1.0, 0.5]),
        ("sum", [-4.5, 1.8], 11.745, [-3.0, 1.0]),
        ("length", [-1.5, 0.9], 1.53, [-3.0, 1.0]),
    ],
)
def test_each_normalization_by_hand(normalization, residual, loss, gap):
    terms = trajectory_balance_terms(**gaps_example(), normalization=normalization)
    assert torch.allclose(terms.residual, torch.tensor(residual))
    assert terms.loss.item() == pytest.approx(loss, abs=1e-5)
    assert torch.allclose(terms.logp_gap, torch.tensor(gap))
    assert torch.allclose(terms.log_z, torch.tensor([0.5, -0.2]))


def test_length_normalization_gradients_by_hand():
    kwargs = gaps_example()
    trajectory_balance_terms(**kwargs, normalization="length").loss.backward()
    # loss = (1/B) sum_i (R_i / n_i)^2: d/d log pi_t = d/d log Z_i = 2 delta_i / (B n_i) with delta_i = R_i / n_i
    assert torch.allclose(kwargs["log_z"].grad, torch.tensor([-1.5 / 3, 0.9 / 2]))
    assert torch.allclose(kwargs["per_token_logps"].grad, torch.tensor([[-0.5] * 3, [0.45, 0.45, 0.0]]))
    # the same with "sum": 2 R_i / B on every token, whatever the length
    kwargs = gaps_example()
    trajectory_balance_terms(**kwargs, normalization="sum").loss.backward()
    assert torch.allclose(kwargs["per_token_logps"].grad, torch.tensor([[-4.5] * 3, [1.8, 1.8, 0.0]]))


@pytest.mark.parametrize(
    "normalization, residual, loss",
    [("sum", [-3.5, 3.5], 12.25), ("length", [-3.5 / 3, 3.5 / 2], ((3.5 / 3) ** 2 + 1.75**2) / 2)],
)
def test_group_estimate_of_log_z_by_hand(normalization, residual, loss):
    terms = trajectory_balance_terms(
        **gaps_example(log_z=None), normalization=normalization, group_index=torch.tensor([7, 7])
    )
    assert torch.allclose(terms.log_z, torch.tensor([1.5, 1.5]))
    assert torch.allclose(terms.residual, torch.tensor(residual))
    assert terms.loss.item() == pytest.approx(loss, abs=1e-5)


def test_group_estimate_is_per_group_and_skips_excluded_sequences():
    # Two groups of one sequence each: the estimate is the sequence's own value, so every residual is zero.
    terms = trajectory_balance_terms(**gaps_example(log_z=None), normalization="sum", group_index=torch.tensor([0, 1]))
    assert torch.allclose(terms.log_z, torch.tensor([5.0, -2.0]))
    assert torch.allclose(terms.residual, torch.zeros(2))
    # An unscorable sequence (NaN reward) does not enter its group's mean.
    kwargs = gaps_example(log_z=None, advantages=torch.tensor([1.0, float("nan")]))
    terms = trajectory_balance_terms(
        **kwargs, normalization="sum", group_index=torch.tensor([3, 3]), sequence_mask=torch.tensor([True, False])
    )
    assert terms.log_z[0].item() == pytest.approx(5.0)
    assert terms.loss.item() == 0.0


def test_group_estimate_is_detached_and_needs_the_groups():
    kwargs = gaps_example(log_z=None)
    trajectory_balance_terms(**kwargs, normalization="sum", group_index=torch.tensor([0, 0])).loss.backward()
    # With log Z detached: d loss / d log pi_t = 2 delta_i / B = (-3.5, 3.5) on each sequence's tokens.
    assert torch.allclose(kwargs["per_token_logps"].grad, torch.tensor([[-3.5] * 3, [3.5, 3.5, 0.0]]))
    with pytest.raises(ValueError, match="group_index"):
        trajectory_balance_terms(**gaps_example(log_z=None))


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="normalization must be"):
        trajectory_balance_loss(**example(), normalization="mean")


# -- the fixed point, on an enumerable toy ----------------------------------------------------------------------------
#
# A tabular autoregressive policy over every sequence of `length` tokens from a vocabulary of 3: one row of logits per
# prefix. The expected on-policy gradient, sum_y pi(y) grad loss(y), is the loss with each sequence weighted by pi(y)
# (sampling_ratio = B pi(y), detached), differentiated through log pi only, as the sampled estimator is.

VOCAB = 3


class TabularToy:
    def __init__(self, length: int, beta: float, seed: int = 0):
        import itertools

        generator = torch.Generator().manual_seed(seed)
        self.length, self.beta = length, beta
        self.sequences = list(itertools.product(range(VOCAB), repeat=length))
        self.prefixes = {
            p: i for i, p in enumerate(q for n in range(length) for q in itertools.product(range(VOCAB), repeat=n))
        }
        self.ref_logits = torch.randn(len(self.prefixes), VOCAB, generator=generator) * 1.5
        # 0/1 reward: correct when the tokens sum to an even number (about half the sequences)
        self.rewards = torch.tensor([float(sum(y) % 2 == 0) for y in self.sequences])

    def token_logps(self, logits):
        """(B, L) log pi(y_t | y_<t) of every sequence under tabular `logits`."""
        logps = torch.log_softmax(logits, dim=-1)
        return torch.stack(
            [torch.stack([logps[self.prefixes[y[:t]], y[t]] for t in range(self.length)]) for y in self.sequences]
        )

    def target_logits(self):
        """Tabular logits whose policy is exactly p* = pi_ref exp(beta r) / Z, and log Z."""
        log_target = self.token_logps(self.ref_logits).sum(-1) + self.beta * self.rewards
        log_z = torch.logsumexp(log_target, 0)
        logits = torch.zeros_like(self.ref_logits)
        for prefix, row in self.prefixes.items():
            for token in range(VOCAB):
                extends = [i for i, y in enumerate(self.sequences) if y[: len(prefix) + 1] == prefix + (token,)]
                logits[row, token] = torch.logsumexp(log_target[extends], 0)
        return logits, log_z

    def expected_gradient(self, logits, log_z, normalization, reward=None):
        logits = logits.clone().requires_grad_(True)
        per_token_logps = self.token_logps(logits)
        probs = per_token_logps.sum(-1).exp().detach()
        B = len(self.sequences)
        loss = trajectory_balance_loss(
            log_z=torch.full((B,), float(log_z)),
            per_token_logps=per_token_logps,
            ref_per_token_logps=self.token_logps(self.ref_logits),
            old_per_token_logps=None,
            advantages=self.rewards if reward is None else reward,
            completion_mask=torch.ones(B, self.length),
            beta=self.beta,
            normalization=normalization,
            sampling_ratio=B * probs,
        )
        (gradient,) = torch.autograd.grad(loss, logits)
        return gradient


@pytest.mark.parametrize("normalization", ["sum", "length"])
@pytest.mark.parametrize("length", [1, 3])
def test_expected_gradient_vanishes_at_the_target(normalization, length):
    toy = TabularToy(length=length, beta=1.5)
    logits, log_z = toy.target_logits()
    gradient = toy.expected_gradient(logits, log_z, normalization)
    assert gradient.abs().max().item() < 1e-5


def test_official_normalization_has_another_fixed_point_for_multi_token_completions():
    for length, nonzero in [(1, False), (3, True)]:
        toy = TabularToy(length=length, beta=1.5)
        logits, _ = toy.target_logits()
        # the log Z that zeroes the expected residual at p*, the best the head could do: E_p*[beta r - gap mean]
        probs = toy.token_logps(logits).sum(-1).exp()
        gap_mean = (toy.token_logps(logits) - toy.token_logps(toy.ref_logits)).mean(-1)
        log_z = (probs * (toy.beta * toy.rewards - gap_mean)).sum()
        gradient = toy.expected_gradient(logits, log_z, "token_mean")
        assert (gradient.abs().max().item() > 1e-2) == nonzero


def test_sum_expected_gradient_is_twice_the_reverse_kl_gradient():
    toy = TabularToy(length=2, beta=1.5)
    target_logits, log_z = toy.target_logits()
    logits = torch.randn(target_logits.shape, generator=torch.Generator().manual_seed(1))
    gradient = toy.expected_gradient(logits, log_z, "sum")
    # KL(pi || p*) over the enumerated sequences, differentiated exactly
    theta = logits.clone().requires_grad_(True)
    log_pi = toy.token_logps(theta).sum(-1)
    log_target = toy.token_logps(target_logits).sum(-1)
    kl = (log_pi.exp() * (log_pi - log_target)).sum()
    (kl_gradient,) = torch.autograd.grad(kl, theta)
    assert torch.allclose(gradient, 2 * kl_gradient, atol=1e-5)


def test_group_estimate_gives_zero_gradient_when_the_policy_is_the_target():
    toy = TabularToy(length=3, beta=1.5)
    logits, _ = toy.target_logits()
    logits.requires_grad_(True)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    rows = torch.randint(len(toy.sequences), (8,), generator=torch.Generator().manual_seed(2))
    per_token_logps = toy.token_logps(logits)[rows]
    for normalization in ("sum", "length"):
        loss = trajectory_balance_loss(
            log_z=None,
            per_token_logps=per_token_logps,
            ref_per_token_logps=toy.token_logps(toy.ref_logits)[rows],
            old_per_token_logps=None,
            advantages=toy.rewards[rows],
            completion_mask=torch.ones(8, 3),
            beta=toy.beta,
            normalization=normalization,
            group_index=groups,
        )
        (gradient,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert loss.item() < 1e-10 and gradient.abs().max().item() < 1e-5
