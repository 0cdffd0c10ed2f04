"""The built-in arithmetic task: sums of a few small numbers, solved by merging two terms at a time.

A problem is a list of positive integers (four terms from 1 to 20 by default), asked as ``What is 12+7+16+5?``. A
solution merges two terms per line and rewrites what is left, then boxes the total::

    12+7=19: 19+16+5
    16+5=21: 19+21
    19+21=40
    \\boxed{40}

Which two terms to merge at each line is free, so a problem with ``n`` terms has up to ``n! (n-1)! / 2^(n-1)``
distinct reasoning paths (3 for three terms, 18 for four). A path is identified by the values it merges, in order:
the path above is ``7+12|5+16|19+21``. Two merge orders that write the same values (possible when a value repeats)
are one path, so a problem can have fewer paths than that bound; `enumerate_paths` lists exactly the distinct ones.

Held-out problems are defined by a fixed hash of the sorted terms, not by the seed: a problem whose multiset of terms
is held out never appears in a train split or in pre-training data, for any seed and any term order.

Not handled: subtraction, products and word problems (the task only needs several valid paths per problem and an
exact way to tell them apart). A derivation that merges three terms in one line, or rewrites the remainder wrongly,
is not a valid path (`path_id` returns None), although its boxed answer may still be graded correct. Answers are
graded by the project's math reward (`trl_flowrl.rewards.MathAccuracyReward`), as on the real datasets.
"""

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass


NUM_TERMS = 4
"""Terms per problem in the default task (the setting the embedded model was pre-trained on)."""
MAX_VALUE = 20
"""Largest term in the default task."""
HELD_OUT_PERCENT = 10
"""Share of all term multisets (by a fixed hash, independent of any seed) reserved for held-out evaluation."""

_HASH_SALT = b"trl-flowrl/arithmetic/v1"
_STEP_RE = re.compile(r"^(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*(?::\s*(\d+(?:\s*\+\s*\d+)*))?$")


@dataclass(frozen=True)
class ArithmeticProblem:
    """A sum of positive integers, in the order the prompt shows them."""

    terms: tuple[int, ...]

    def __post_init__(self):
        if len(self.terms) < 2:
            raise ValueError(f"An arithmetic problem needs at least 2 terms, got {self.terms}.")
        if any(not isinstance(t, int) or t < 1 for t in self.terms):
            raise ValueError(f"Terms must be positive integers, got {self.terms}.")

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def solution(self) -> str:
        """The gold answer as a plain number string (TRL's `solution` column convention)."""
        return str(self.answer)

    @property
    def question(self) -> str:
        return "What is " + "+".join(map(str, self.terms)) + "?"

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversational prompt, as TRL's datasets hold it."""
        return [{"role": "user", "content": self.question}]

    @property
    def is_held_out(self) -> bool:
        return is_held_out(self.terms)


def is_held_out(terms) -> bool:
    """Whether a problem with these terms (in any order) belongs to the held-out set."""
    key = ",".join(map(str, sorted(terms))).encode()
    digest = hashlib.blake2b(key, digest_size=8, key=_HASH_SALT).digest()
    return int.from_bytes(digest, "big") % 100 < HELD_OUT_PERCENT


def generate_problems(
    num_problems: int,
    seed: int = 0,
    split: str = "train",
    num_terms: int = NUM_TERMS,
    max_value: int = MAX_VALUE,
    unique: bool = True,
) -> list[ArithmeticProblem]:
    """Draw `num_problems` problems of `num_terms` terms in 1..`max_value`, deterministically from `seed`.

    `split="train"` keeps only problems outside the held-out set, `split="test"` only problems inside it. With
    `unique=True` no two problems share a multiset of terms (a reordering of a problem counts as the same problem).
    Raises ValueError when the split cannot hold that many unique problems.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if num_terms < 2 or max_value < 1:
        raise ValueError(f"Need num_terms >= 2 and max_value >= 1, got {num_terms} and {max_value}.")
    want_held_out = split == "test"
    rng = random.Random(f"{seed}/{split}/{num_terms}/{max_value}")
    problems, seen = [], set()
    attempts, max_attempts = 0, 1000 * num_problems + 10_000
    while len(problems) < num_problems:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"Could only draw {len(problems)} unique {split} problems of {num_terms} terms up to {max_value}; "
                "ask for fewer, raise max_value, or pass unique=False."
            )
        terms = tuple(rng.randint(1, max_value) for _ in range(num_terms))
        if is_held_out(terms) != want_held_out:
            continue
        key = tuple(sorted(terms))
        if unique and key in seen:
            continue
        seen.add(key)
        problems.append(ArithmeticProblem(terms))
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Paths


def _merge(state: list[int], i: int, j: int) -> list[int]:
    """Replace state[i] by state[i] + state[j] and drop state[j] (i < j), keeping the other terms in order."""
    merged = state[:i] + [state[i] + state[j]] + state[i + 1 :]
    del merged[j]
    return merged


def _render(steps: list[tuple[int, int, list[int]]]) -> str:
    lines = [f"{x}+{y}={x + y}" + (f": {'+'.join(map(str, rest))}" if len(rest) > 1 else "") for x, y, rest in steps]
    total = steps[-1][0] + steps[-1][1]
    return "\n".join(lines) + f"\n\\boxed{{{total}}}"


def _path_key(pairs) -> str:
    return "|".join(f"{min(x, y)}+{max(x, y)}" for x, y in pairs)


def enumerate_paths(problem: ArithmeticProblem) -> dict[str, str]:
    """Every distinct valid reasoning path of `problem`, as {path id: completion text}.

    Ordered by a depth-first walk over merge positions (left pair first). Each text is graded correct and maps back
    to its key with `path_id`.
    """
    paths: dict[str, str] = {}

    def walk(state: list[int], steps: list[tuple[int, int, list[int]]]):
        if len(state) == 1:
            key = _path_key((x, y) for x, y, _ in steps)
            paths.setdefault(key, _render(steps))
            return
        for i in range(len(state)):
            for j in range(i + 1, len(state)):
                rest = _merge(state, i, j)
                walk(rest, steps + [(state[i], state[j], rest)])

    walk(list(problem.terms), [])
    return paths


def count_paths(problem: ArithmeticProblem) -> int:
    """The number of distinct valid reasoning paths of `problem`."""
    return len(enumerate_paths(problem))


def path_id(problem: ArithmeticProblem, completion: str) -> str | None:
    """The canonical id of the reasoning path written in `completion`, or None if it is not a valid path.

    Valid means: every line but the last merges two terms that are present, with the right sum; a rewritten
    remainder after ``:``, when given, holds exactly the remaining terms (in any order); the last step leaves one
    term; and the completion ends with ``\\boxed{total}``. Whitespace around tokens and blank lines are tolerated;
    the two terms of a line may be written in either order.
    """
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    state = Counter(problem.terms)
    pairs = []
    for line in lines[:-1]:
        match = _STEP_RE.match(line)
        if match is None:
            return None
        x, y, z = (int(g) for g in match.group(1, 2, 3))
        if z != x + y:
            return None
        merged = Counter([x, y])
        if any(state[value] < count for value, count in merged.items()):
            return None
        state = state - merged + Counter([z])
        rest = match.group(4)
        if rest is not None and Counter(int(t) for t in rest.split("+")) != state:
            return None
        pairs.append((x, y))
    if sum(state.values()) != 1 or len(pairs) != len(problem.terms) - 1:
        return None
    boxed = re.fullmatch(r"\\boxed\{\s*(\d+)\s*\}", lines[-1])
    if boxed is None or int(boxed.group(1)) != problem.answer:
        return None
    return _path_key(pairs)
