"""Accuracy and diversity metrics over k sampled completions per problem, as pure functions.

Accuracy:
- `avg_at_k`: mean correctness over the samples of each problem, averaged over problems (what papers report as
  Avg@16, or as pass@1 estimated from k samples).
- `pass_at_k`: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that k samples drawn without
  replacement from the n generated (c of them correct) contain a correct one; `pass_at_k_curve` averages it over
  problems for k = 1, 2, 4, ..., n.

Diversity among one problem's samples:
- `count_distinct`: distinct values (final answers, reasoning-path ids), None ignored.
- `entropy`: Shannon entropy (nats) of the empirical distribution of values, None ignored.
- `distinct_n`: unique n-grams / all n-grams, pooled over the samples.
- `self_bleu`: the mean BLEU-4 of each sample against all the others (1 = identical samples).

Texts are split by `tokenize` into words and single punctuation marks (`3+4=7` gives `3 + 4 = 7`), so the n-gram
metrics do not depend on any model's tokenizer and compare across models. Not handled: semantic similarity
(two samples that say the same thing in different words count as different; that is what the judge rubric is for).
"""

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


_TOKEN = re.compile(r"\w+|[^\w\s]")


# -- accuracy -------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomial coefficients. Requires
    0 <= c <= n and 1 <= k <= n.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be integers, got {n!r}, {c!r}, {k!r}.")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"Need n >= 1 and 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (the number of samples), got k={k}, n={n}.")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def default_ks(n: int) -> list[int]:
    """The k values of a pass@k curve for n samples: 1, 2, 4, ... up to n, with n itself always included."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k_curve(
    num_samples: Sequence[int], num_correct: Sequence[int], ks: Sequence[int] | None = None
) -> dict[int, float]:
    """Mean over problems of `pass_at_k(n_i, c_i, k)` for each k.

    Args:
        num_samples: (P,) samples generated per problem.
        num_correct: (P,) correct samples per problem.
        ks: the k values; default `default_ks(min(num_samples))`. Each must be <= every n_i.

    Returns: {k: mean pass@k}, in the order of `ks`.
    """
    if len(num_samples) != len(num_correct):
        raise ValueError(f"Got {len(num_samples)} sample counts but {len(num_correct)} correct counts.")
    if not num_samples:
        raise ValueError("pass@k needs at least one problem.")
    if ks is None:
        ks = default_ks(min(num_samples))
    return {k: sum(pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)) / len(num_samples) for k in ks}


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of a problem's samples that are correct.

    Args:
        correct: (P, k_i) correctness of sample j of problem i. Each problem needs at least one sample.
    """
    if not correct:
        raise ValueError("avg@k needs at least one problem.")
    if any(len(samples) == 0 for samples in correct):
        raise ValueError("Every problem needs at least one sample.")
    return sum(sum(map(bool, samples)) / len(samples) for samples in correct) / len(correct)


# -- counting distinct values ---------------------------------------------------------------------------------------


def count_distinct(values: Iterable[Hashable | None]) -> int:
    """The number of distinct values, None ignored (a sample with no final answer or no identifiable path)."""
    return len({v for v in values if v is not None})


def entropy(values: Iterable[Hashable | None]) -> float:
    """Shannon entropy (nats) of the empirical distribution of the values, None ignored; 0.0 when none is left."""
    counts = Counter(v for v in values if v is not None)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


# -- n-gram diversity -----------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Words (runs of letters, digits, underscores) and single punctuation marks; whitespace dropped."""
    return _TOKEN.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of `tokens`; empty when len(tokens) < n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams over all n-grams, pooled over `texts`; None when the texts hold no n-gram at all."""
    pooled = Counter()
    for text in texts:
        pooled.update(ngrams(tokenize(text), n))
    total = sum(pooled.values())
    return len(pooled) / total if total else None


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU of a tokenized hypothesis against tokenized references, add-one smoothed for n >= 2.

    p_1 = m_1 / l_1 and p_n = (m_n + 1) / (l_n + 1) for n = 2..max_n, where l_n is the number of n-grams of the
    hypothesis and m_n how many of them match, each n-gram's count clipped to its largest count in any one reference
    (Lin and Och, 2004, smoothing for n > 1). BLEU = BP * exp(mean_n log p_n), with brevity penalty
    BP = exp(1 - r / c) when the hypothesis length c is at most the reference length r closest to it (ties: the
    shorter), else 1. An empty hypothesis, or one with no unigram in any reference, scores 0.
    """
    if not references:
        raise ValueError("BLEU needs at least one reference.")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}.")
    if not hypothesis:
        return 0.0
    max_ref_counts = []
    for n in range(1, max_n + 1):
        merged = Counter()
        for reference in references:
            merged |= ngrams(reference, n)  # | keeps the maximum count of each n-gram
        max_ref_counts.append(merged)
    return _bleu_from_counts(hypothesis, [len(r) for r in references], max_ref_counts, max_n)


def _bleu_from_counts(
    hypothesis: Sequence[str], ref_lengths: Sequence[int], max_ref_counts: Sequence[Counter], max_n: int
) -> float:
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_counts = ngrams(hypothesis, n)
        total = sum(hyp_counts.values())
        matches = sum(min(count, max_ref_counts[n - 1][gram]) for gram, count in hyp_counts.items())
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    c = len(hypothesis)
    r = min(ref_lengths, key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision / max_n)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float | None:
    """Mean over samples of the BLEU of each one (hypothesis) against all the others (references).

    1.0 when all samples are identical, near 0 when they share nothing. None with fewer than two samples.
    Runs in time linear in the total length: for each n-gram only the two largest counts over samples are kept, so
    the clipping count "largest count in any other sample" is read in O(1).
    """
    if len(texts) < 2:
        return None
    tokenized = [tokenize(text) for text in texts]
    per_n = []  # for each n: sample counters, and per n-gram (best count, best owner, second best count)
    for n in range(1, max_n + 1):
        counters = [ngrams(tokens, n) for tokens in tokenized]
        top: dict[tuple, list] = {}
        for owner, counts in enumerate(counters):
            for gram, count in counts.items():
                entry = top.get(gram)
                if entry is None:
                    top[gram] = [count, owner, 0]
                elif count > entry[0]:
                    top[gram] = [count, owner, entry[0]]
                elif count > entry[2]:
                    entry[2] = count
        per_n.append(top)
    lengths = [len(tokens) for tokens in tokenized]
    scores = []
    for i, tokens in enumerate(tokenized):
        if not tokens:
            scores.append(0.0)
            continue
        max_ref_counts = [_OthersMax(top, i) for top in per_n]
        ref_lengths = lengths[:i] + lengths[i + 1 :]
        scores.append(_bleu_from_counts(tokens, ref_lengths, max_ref_counts, max_n))
    return sum(scores) / len(scores)


class _OthersMax:
    """Read-only view `view[gram]`: the largest count of `gram` in any sample but `excluded`."""

    def __init__(self, top: dict[tuple, list], excluded: int):
        self.top = top
        self.excluded = excluded

    def __getitem__(self, gram) -> int:
        entry = self.top.get(gram)
        if entry is None:
            return 0
        best, owner, second = entry
        return second if owner == self.excluded else best
