"""Accuracy and diversity metrics against values worked out by hand.

pass@k = 1 - C(n-c, k) / C(n, k). Hand cases:
    n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
    n=k: 1 if c > 0 else 0;  c=0: 0;  c=n: 1;  k=1: c/n

BLEU-4 with add-one smoothing for n >= 2 (p_1 = m_1/l_1, p_n = (m_n+1)/(l_n+1)):
    hyp "a b c d", ref "a b c e": p = 3/4, (2+1)/(3+1), (1+1)/(2+1), (0+1)/(1+1) -> (3/4 * 3/4 * 2/3 * 1/2)^(1/4)
    hyp "a b", ref "a b c d": p = 1, 1, 1, 1; c=2 <= r=4 -> BP = exp(1 - 4/2) = e^-1
    hyp "the the the the", refs "the cat", "the the dog": clipped unigram 2/4, bigram (1+1)/(3+1),
        trigram (0+1)/(2+1), 4-gram (0+1)/(1+1); closest ref length 3 < 4 -> BP 1 -> (1/24)^(1/4)
    self-BLEU of "a b", "a c": each against the other p = 1/2, (0+1)/(1+1), 1, 1 -> (1/4)^(1/4) = 1/sqrt(2)
"""

import math
from fractions import Fraction

import pytest

from trl_flowrl.evaluation import metrics
from trl_flowrl.evaluation.metrics import (
    avg_at_k,
    bleu,
    count_distinct,
    default_ks,
    distinct_n,
    entropy,
    pass_at_k,
    pass_at_k_curve,
    self_bleu,
    tokenize,
)


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_pass_at_k_n_equals_k_and_extremes(n):
    assert pass_at_k(n, 0, n) == 0.0
    assert pass_at_k(n, 1, n) == 1.0
    assert pass_at_k(n, n, n) == 1.0
    for k in range(1, n + 1):
        assert pass_at_k(n, 0, k) == 0.0
        assert pass_at_k(n, n, k) == 1.0


def test_pass_at_k_matches_exact_binomials_on_every_small_case():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
                if k == 1:
                    assert pass_at_k(n, c, k) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) has about 300 digits: a float quotient of binomials would overflow.
    for n, c, k in [(1000, 3, 500), (1000, 1, 1), (2048, 10, 1024), (1000, 990, 5)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0), (0, 0, 1)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(2) == [1, 2]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(16) == [1, 2, 4, 8, 16]


def test_pass_at_k_curve_averages_over_problems():
    curve = pass_at_k_curve([4, 4], [0, 2])
    assert list(curve) == [1, 2, 4]
    assert curve[1] == pytest.approx((0 + 0.5) / 2)
    assert curve[2] == pytest.approx((0 + 5 / 6) / 2)
    assert curve[4] == pytest.approx((0 + 1) / 2)
    assert pass_at_k_curve([4, 4], [1, 1], ks=[3]) == {3: pytest.approx(0.75)}
    with pytest.raises(ValueError):
        pass_at_k_curve([4], [1, 2])
    with pytest.raises(ValueError):
        pass_at_k_curve([4, 2], [1, 1], ks=[4])  # k above the second problem's n


def test_avg_at_k():
    assert avg_at_k([[True, False], [True, True, True, False]]) == pytest.approx((0.5 + 0.75) / 2)
    assert avg_at_k([[False] * 16]) == 0.0
    assert avg_at_k([[True] * 16, [True] * 16]) == 1.0
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def test_count_distinct_and_entropy():
    assert count_distinct(["4", None, "4", "5"]) == 2
    assert count_distinct([None, None]) == 0
    assert entropy(["A", "A", "B", "B", None]) == pytest.approx(math.log(2))
    assert entropy(["A", "A", "B"]) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert entropy(["A", "A"]) == 0.0
    assert entropy([None]) == 0.0


def test_tokenize_splits_words_and_punctuation():
    assert tokenize("3+4=7: 7+5\n\\boxed{12}") == [
        "3",
        "+",
        "4",
        "=",
        "7",
        ":",
        "7",
        "+",
        "5",
        "\\",
        "boxed",
        "{",
        "12",
        "}",
    ]
    assert tokenize("  ") == []


def test_distinct_n():
    texts = ["a b a", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(texts, 4) is None  # no 4-gram at all
    assert distinct_n(["same text here", "same text here"], 1) == pytest.approx(3 / 6)


def test_bleu_hand_values():
    assert bleu(tokenize("a b c d"), [tokenize("a b c e")]) == pytest.approx((3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert bleu(tokenize("a b"), [tokenize("a b c d")]) == pytest.approx(math.exp(-1))
    assert bleu(tokenize("the the the the"), [tokenize("the cat"), tokenize("the the dog")]) == pytest.approx(
        (1 / 24) ** 0.25
    )


def test_bleu_edge_cases():
    assert bleu(tokenize("a b c d e"), [tokenize("a b c d e")]) == pytest.approx(1.0)
    assert bleu([], [tokenize("a")]) == 0.0
    assert bleu(tokenize("x y"), [tokenize("a b")]) == 0.0  # no unigram in common
    # Reference lengths 2 and 4 are equally close to 3: the shorter one is taken, so no brevity penalty.
    assert bleu(tokenize("a b c"), [tokenize("a b"), tokenize("a b c d")]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_self_bleu_hand_values():
    assert self_bleu(["a b", "a c"]) == pytest.approx(1 / math.sqrt(2))
    assert self_bleu(["the same answer", "the same answer", "the same answer"]) == pytest.approx(1.0)
    assert self_bleu(["a b c", "x y z"]) == 0.0
    assert self_bleu(["only one"]) is None
    assert self_bleu(["", "a b"]) == pytest.approx(0.0)  # an empty hypothesis scores 0, "a b" has no match


def test_self_bleu_matches_the_definition_including_ties():
    # "a" appears twice in samples 0 and 1: the clipping count for sample 0 must come from sample 1 (a tie).
    texts = ["a a b c", "a a c d e", "a d", "b c d e f g", "a a b c"]
    expected = sum(
        bleu(tokenize(texts[i]), [tokenize(t) for j, t in enumerate(texts) if j != i]) for i in range(len(texts))
    ) / len(texts)
    assert self_bleu(texts) == pytest.approx(expected, abs=1e-12)


def test_ngrams_rejects_zero():
    with pytest.raises(ValueError):
        metrics.ngrams(["a"], 0)
