"""The built-in programming task: small stdin/stdout problems, each with tests, correct programs and wrong programs.

A problem is a kind and a parameter K, asked as one user message::

    Write a Python program that reads a line of integers and prints their sum plus 17. Answer in a ```python block.

and answered with one fenced code block, graded by `trl_flowrl.rewards.CodeReward` against the problem's stdin/stdout
cases. The kinds (`KINDS`), each with K in 10..29:

- a line of integers -> an aggregate (sum, largest, smallest, count, sum of squares, largest minus smallest) plus K
  or multiplied by K (12 kinds);
- an integer n -> n multiplied by K, n modulo K, or the first n multiples of K;
- a word -> the word K times, the word followed by K, its length plus K.

That is 360 problems (323 for training, 37 held out). The expected output of every case is computed here by plain
Python, never by running a program. Each problem lists several correct programs that differ in construction (a
built-in vs a loop, sorting vs `max`, operand order), e.g. ``print(sum(map(int, input().split())) + 17)`` and a loop
that accumulates ``s``, and a few wrong programs: common bugs such as summing the strings of `input().split()`, the
wrong end of a sorted list, `^` for a power, a missing pair of parentheses under `*`, an off-by-one range, or
`input() * 17` for an integer. Every wrong program fails its problem's tests (the test suite checks every problem with
the cases of two seeds; other inputs can let one pass by coincidence, rarely: the smallest value passes for the largest
only when every case holds a single number or equal ones). Several are correct programs of another kind (`input() *
17` repeats a word), so telling them apart means reading the prompt.

The embedded model is pre-trained on both (`pretraining_completion`: a wrong program with probability
`WRONG_SHARE`), as a model trained on unverified code would be: it starts out writing a correct program about half of
the time, and a 1/0 reward from the tests can teach it which constructions pass.

Two programs are the same when their code parses to the same syntax tree: `program_id` is the code of the completion's
last fenced block, parsed and unparsed by `ast`, so spacing, comments, quotes and redundant parentheses do not make a
program distinct, while another construct, operand order or variable name does.

Held-out problems are chosen by a fixed hash of (kind, parameter), not by the seed: a held-out problem never appears in
a train split or in pre-training data, for any seed. Its tests (drawn from the seed) are new inputs as well. Every kind
has many parameters, so the held-out problems are new instances of kinds seen in training.

Not handled: problems that need more than one line of input, floating-point output, or reasoning before the code;
programs are not checked for efficiency (every case is tiny); the listed wrong programs are a fixed set, not every
way a program can be wrong.
"""

import ast
import hashlib
import random
import string
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..rewards.code_reward import extract_code


NUM_CASES = 4
"""Stdin/stdout cases per problem in the default task."""
HELD_OUT_PERCENT = 10
"""Share of all (kind, parameter) pairs (by a fixed hash, independent of any seed) reserved for held-out evaluation."""
INSTRUCTION = "Answer in a ```python block."
"""The sentence that ends every prompt."""
WRONG_SHARE = 0.5
"""Share of the embedded model's pre-training completions that are listed wrong programs (`pretraining_completion`)."""

_HASH_SALT = b"trl-flowrl/programs/v1"


# ----------------------------------------------------------------------------------------------------------------
# Kinds


@dataclass(frozen=True)
class _Kind:
    reads: str
    prints: Callable[[int], str]
    make_input: Callable[[random.Random], str]
    solve: Callable[[str, int], str]
    programs: Callable[[int], list[str]]
    wrong_programs: Callable[[int], list[str]]
    params: tuple = tuple(range(10, 30))
    # Always two digits, 20 values shared by every kind, so the model learns to copy K from the prompt. After 3000
    # pre-training steps the earlier 432k-parameter four-head model copied two-digit constants but no one-character one
    # (a letter or a digit, each with fewer values per kind); with K in 10..99 it copied none within 1000 steps.


def _ints_input(rng: random.Random) -> str:
    return " ".join(str(rng.randint(-9, 30)) for _ in range(rng.randint(1, 6))) + "\n"


def _int_input(low: int, high: int):
    return lambda rng: f"{rng.randint(low, high)}\n"


def _word_input(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) + "\n"


# An aggregate: (what the prompt calls it, its value, correct styles, wrong styles). A style is (set-up lines,
# expression, compound): the program is the set-up, then `print(expression <op> K)`; a compound expression gets
# parentheses under `*` (and, left without them, is one more wrong program: an operator-precedence bug).
_AGGREGATES = {
    "sum": (
        "their sum",
        sum,
        [
            ([], "sum(map(int, input().split()))", False),
            (["a = list(map(int, input().split()))"], "sum(a)", False),
            (["s = 0", "for x in input().split():", "    s += int(x)"], "s", False),
            ([], "sum(int(x) for x in input().split())", False),
        ],
        [
            ([], "sum(input().split())", False),  # strings, not numbers: TypeError
            (["s = 0", "for x in input().split():", "    s += x"], "s", False),  # TypeError
            (["s = 0", "for x in input():", "    s += int(x)"], "s", False),  # characters, not numbers
        ],
    ),
    "max": (
        "their largest value",
        max,
        [
            ([], "max(map(int, input().split()))", False),
            (["a = sorted(map(int, input().split()))"], "a[-1]", False),
            (["a = list(map(int, input().split()))", "m = a[0]", "for x in a:", "    m = max(m, x)"], "m", False),
        ],
        [
            (["a = sorted(map(int, input().split()))"], "a[0]", False),  # the wrong end
            ([], "max(input().split())", False),  # the largest string
        ],
    ),
    "min": (
        "their smallest value",
        min,
        [
            ([], "min(map(int, input().split()))", False),
            (["a = sorted(map(int, input().split()))"], "a[0]", False),
            (["a = list(map(int, input().split()))", "m = a[0]", "for x in a:", "    m = min(m, x)"], "m", False),
        ],
        [
            (["a = sorted(map(int, input().split()))"], "a[-1]", False),
            ([], "min(input().split())", False),
        ],
    ),
    "count": (
        "their count",
        len,
        [
            ([], "len(input().split())", False),
            (["a = input().split()"], "len(a)", False),
            (["c = 0", "for x in input().split():", "    c += 1"], "c", False),
        ],
        [
            ([], "len(input())", False),  # characters, not numbers
            (["c = 0", "for x in input():", "    c += 1"], "c", False),
        ],
    ),
    "squares": (
        "the sum of their squares",
        lambda values: sum(v * v for v in values),
        [
            ([], "sum(int(x) ** 2 for x in input().split())", False),
            (["a = list(map(int, input().split()))"], "sum(x * x for x in a)", False),
            (["s = 0", "for x in input().split():", "    s += int(x) ** 2"], "s", False),
        ],
        [
            ([], "sum(int(x) ^ 2 for x in input().split())", False),  # ^ is xor
            (["a = list(map(int, input().split()))"], "sum(x * 2 for x in a)", False),
            ([], "sum(map(int, input().split())) ** 2", False),  # the square of the sum
        ],
    ),
    "spread": (
        "their spread (largest minus smallest)",
        lambda values: max(values) - min(values),
        [
            (["a = list(map(int, input().split()))"], "max(a) - min(a)", True),
            (["a = sorted(map(int, input().split()))"], "a[-1] - a[0]", True),
            (["a = list(map(int, input().split()))", "d = max(a) - min(a)"], "d", False),
        ],
        [
            (["a = sorted(map(int, input().split()))"], "a[-1] - a[1]", True),  # the second smallest
            (["a = list(map(int, input().split()))"], "min(a) - max(a)", True),  # the wrong sign
        ],
    ),
}
_MODIFIERS = {"plus": ("plus", "+", lambda x, k: x + k), "times": ("multiplied by", "*", lambda x, k: x * k)}


def _aggregate_kind(aggregate: str, modifier: str) -> _Kind:
    noun, value, styles, wrong_styles = _AGGREGATES[aggregate]
    words, op, apply = _MODIFIERS[modifier]

    def render(style, k, swapped=False, parenthesize=True):
        setup, expr, compound = style
        operand = f"({expr})" if compound and op == "*" and parenthesize else expr
        return "\n".join([*setup, f"print({k} {op} {operand})" if swapped else f"print({operand} {op} {k})"])

    def programs(k):
        # every style, then the one-liner with its operands swapped
        return [render(style, k) for style in styles] + [render(styles[0], k, swapped=True)]

    def wrong_programs(k):
        out = [render(style, k) for style in wrong_styles]
        if op == "*":  # a compound expression left without its parentheses
            compound = [style for style in styles if style[2]]
            out += [render(style, k, parenthesize=False) for style in compound]
            out += [render(style, k, swapped=True, parenthesize=False) for style in compound[:1]]
        return out

    return _Kind(
        reads="a line of integers",
        prints=lambda k: f"{noun} {words} {k}",
        make_input=_ints_input,
        solve=lambda text, k: str(apply(value([int(x) for x in text.split()]), k)),
        programs=programs,
        wrong_programs=wrong_programs,
    )


KINDS: dict[str, _Kind] = {
    f"{aggregate}_{modifier}": _aggregate_kind(aggregate, modifier)
    for aggregate in _AGGREGATES
    for modifier in _MODIFIERS
}
KINDS["int_times"] = _Kind(
    reads="an integer n",
    prints=lambda k: f"n multiplied by {k}",
    make_input=_int_input(-50, 99),
    solve=lambda text, k: str(int(text) * k),
    programs=lambda k: [
        f"print(int(input()) * {k})",
        f"n = int(input())\nprint(n * {k})",
        f"print({k} * int(input()))",
        f"n = int(input())\ns = 0\nfor _ in range({k}):\n    s += n\nprint(s)",
    ],
    wrong_programs=lambda k: [
        f"print(input() * {k})",  # repeats the text
        f"n = input()\nprint(n * {k})",
        f"n = int(input())\ns = n\nfor _ in range({k}):\n    s += n\nprint(s)",  # one term too many
    ],
)
KINDS["int_mod"] = _Kind(
    reads="an integer n",
    prints=lambda k: f"the remainder of n divided by {k}",
    make_input=_int_input(0, 500),
    solve=lambda text, k: str(int(text) % k),
    programs=lambda k: [
        f"print(int(input()) % {k})",
        f"n = int(input())\nprint(n % {k})",
        f"n = int(input())\nprint(n - n // {k} * {k})",
        f"print(divmod(int(input()), {k})[1])",
    ],
    wrong_programs=lambda k: [
        f"print(int(input()) // {k})",  # the quotient
        f"print(divmod(int(input()), {k})[0])",
        f"n = int(input())\nprint(n - n // {k})",
    ],
)
KINDS["int_multiples"] = _Kind(
    reads="an integer n",
    prints=lambda k: f"the first n multiples of {k} on one line",
    make_input=_int_input(1, 6),
    solve=lambda text, k: " ".join(str(k * i) for i in range(1, int(text) + 1)),
    programs=lambda k: [
        f"n = int(input())\nprint(*range({k}, {k} * n + 1, {k}))",
        f"n = int(input())\nprint(*[{k} * i for i in range(1, n + 1)])",
        f"n = int(input())\nprint(' '.join(str({k} * i) for i in range(1, n + 1)))",
        f"n = int(input())\nfor i in range(1, n + 1):\n    print({k} * i, end=' ')\nprint()",
    ],
    wrong_programs=lambda k: [
        f"n = int(input())\nprint(*range({k}, {k} * n, {k}))",  # one short
        f"n = int(input())\nprint(*[{k} * i for i in range(n)])",  # starts at 0
        f"n = int(input())\nfor i in range(1, n + 1):\n    print({k} * i)",  # one per line
    ],
)
KINDS["word_repeat"] = _Kind(
    reads="a word",
    prints=lambda k: f"it {k} times on one line, with no spaces",
    make_input=_word_input,
    solve=lambda text, k: text.strip() * k,
    programs=lambda k: [
        f"print(input() * {k})",
        f"w = input()\nprint(w * {k})",
        f"print({k} * input())",
        f"print(''.join([input()] * {k}))",
        f"w = input()\ns = ''\nfor _ in range({k}):\n    s += w\nprint(s)",
    ],
    wrong_programs=lambda k: [
        f"print(' '.join([input()] * {k}))",  # with spaces
        f"w = input()\ns = w\nfor _ in range({k}):\n    s += w\nprint(s)",  # once too many
        f"for _ in range({k}):\n    print(input(), end='')",  # reads past the input
    ],
)
KINDS["word_suffix"] = _Kind(
    reads="a word",
    prints=lambda k: f"it followed by the number {k}, with no space",
    make_input=_word_input,
    solve=lambda text, k: f"{text.strip()}{k}",
    programs=lambda k: [
        f"print(input() + '{k}')",
        f"print(input() + str({k}))",
        f"w = input()\nprint(w + '{k}')",
        f"print(input(), {k}, sep='')",
    ],
    wrong_programs=lambda k: [
        f"print(input(), {k})",  # a space between
        f"print(input() + {k})",  # TypeError
        f"print('{k}' + input())",  # before, not after
    ],
)
KINDS["word_length"] = _Kind(
    reads="a word",
    prints=lambda k: f"its length plus {k}",
    make_input=_word_input,
    solve=lambda text, k: str(len(text.strip()) + k),
    programs=lambda k: [
        f"print(len(input()) + {k})",
        f"w = input()\nprint(len(w) + {k})",
        f"print({k} + len(input()))",
        f"n = 0\nfor c in input():\n    n += 1\nprint(n + {k})",
    ],
    wrong_programs=lambda k: [
        f"print(len(input().split()) + {k})",  # counts words
        f"n = 1\nfor c in input():\n    n += 1\nprint(n + {k})",  # starts at 1
        f"print(len(input() + '{k}'))",
    ],
)


# ----------------------------------------------------------------------------------------------------------------
# Problems


def is_held_out(kind: str, param) -> bool:
    """Whether the problem (kind, parameter) belongs to the held-out set (a fixed hash, the same for every seed)."""
    digest = hashlib.blake2b(f"{kind}/{param}".encode(), digest_size=8, key=_HASH_SALT).digest()
    return int.from_bytes(digest, "big") % 100 < HELD_OUT_PERCENT


def all_problem_keys(split: str | None = None) -> list[tuple[str, object]]:
    """Every (kind, parameter) pair, in a fixed order; only those of `split` ("train" or "test") when given."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}.")
    keys = [(kind, param) for kind, spec in KINDS.items() for param in spec.params]
    if split is None:
        return keys
    return [key for key in keys if is_held_out(*key) == (split == "test")]


@dataclass(frozen=True)
class ProgrammingProblem:
    """A kind, its parameter, and the stdin/stdout cases that grade it (expected outputs computed in Python)."""

    kind: str
    param: int
    cases: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown problem kind {self.kind!r}; known kinds: {sorted(KINDS)}.")
        if self.param not in KINDS[self.kind].params:
            raise ValueError(
                f"{self.param!r} is not a parameter of {self.kind!r} (allowed: {KINDS[self.kind].params})."
            )
        if not self.cases:
            raise ValueError("A programming problem needs at least one test case.")

    @property
    def key(self) -> str:
        """`kind/param`: the problem's identity (the same problem under another seed has other cases)."""
        return f"{self.kind}/{self.param}"

    @property
    def question(self) -> str:
        spec = KINDS[self.kind]
        return f"Write a Python program that reads {spec.reads} and prints {spec.prints(self.param)}. {INSTRUCTION}"

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversational prompt, as TRL's datasets hold it."""
        return [{"role": "user", "content": self.question}]

    @property
    def tests(self) -> dict:
        """The cases in the normalised `stdio` format that `CodeReward` reads."""
        return {"style": "stdio", "cases": [{"input": i, "output": o} for i, o in self.cases]}

    @property
    def is_held_out(self) -> bool:
        return is_held_out(self.kind, self.param)


def make_problem(kind: str, param: int, rng: random.Random, num_cases: int = NUM_CASES) -> ProgrammingProblem:
    """The problem (kind, param) with `num_cases` distinct stdin inputs drawn from `rng`."""
    if kind not in KINDS:
        raise ValueError(f"Unknown problem kind {kind!r}; known kinds: {sorted(KINDS)}.")
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}.")
    spec = KINDS[kind]
    inputs: list[str] = []
    for _ in range(100 * num_cases):
        text = spec.make_input(rng)
        if text not in inputs:
            inputs.append(text)
        if len(inputs) == num_cases:
            break
    return ProgrammingProblem(kind, param, tuple((text, spec.solve(text, param)) for text in inputs))


def generate_problems(
    num_problems: int, seed: int = 0, split: str = "train", num_cases: int = NUM_CASES, unique: bool = True
) -> list[ProgrammingProblem]:
    """Draw `num_problems` problems of `split` and their cases, deterministically from `seed`.

    `split="train"` keeps only problems outside the held-out set, `split="test"` only problems inside it (37 of
    the 360). Problems are drawn uniformly among the split's (kind, parameter) pairs; with `unique=True` no pair repeats.
    Raises ValueError when the split has fewer than `num_problems` pairs and `unique=True`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    keys = all_problem_keys(split)
    if unique and num_problems > len(keys):
        raise ValueError(
            f"The {split} split has only {len(keys)} unique problems, {num_problems} were asked; ask for fewer or pass "
            "unique=False."
        )
    rng = random.Random(f"{seed}/{split}/programs")
    chosen = rng.sample(keys, num_problems) if unique else [rng.choice(keys) for _ in range(num_problems)]
    return [make_problem(kind, param, rng, num_cases) for kind, param in chosen]


# ----------------------------------------------------------------------------------------------------------------
# Programs


def program_id(completion) -> str | None:
    """The canonical text of the program in `completion`: its last fenced code block, parsed and unparsed by `ast`.

    Accepts a string or a conversational completion (list of messages). None when there is no fenced block or the
    code does not parse. Two completions with the same id run the same program.
    """
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    code = extract_code(text)
    if code is None:
        return None
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" in sampled junk
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def format_completion(program: str) -> str:
    """A program as the task's completion: one ```python fenced block."""
    return f"```python\n{program}\n```"


def enumerate_programs(problem: ProgrammingProblem) -> dict[str, str]:
    """The listed correct programs of `problem`, as {program id: completion text}, in a fixed order.

    Each completion passes the problem's tests and maps back to its key with `program_id`.
    """
    programs: dict[str, str] = {}
    for program in KINDS[problem.kind].programs(problem.param):
        completion = format_completion(program)
        programs.setdefault(program_id(completion), completion)
    return programs


def enumerate_wrong_programs(problem: ProgrammingProblem) -> dict[str, str]:
    """The listed wrong programs of `problem` (common bugs, each failing its tests), as {program id: completion}."""
    programs: dict[str, str] = {}
    for program in KINDS[problem.kind].wrong_programs(problem.param):
        completion = format_completion(program)
        programs.setdefault(program_id(completion), completion)
    return programs


def pretraining_completion(problem: ProgrammingProblem, rng: random.Random) -> str:
    """A completion for the embedded model's pre-training: with probability `WRONG_SHARE` one of the problem's listed
    wrong programs, otherwise one of its correct programs, uniformly within each list."""
    listed = enumerate_wrong_programs(problem) if rng.random() < WRONG_SHARE else enumerate_programs(problem)
    return rng.choice(list(listed.values()))
