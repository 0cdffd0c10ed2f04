"""The built-in tasks as `datasets.Dataset`s in TRL's formats.

- `arithmetic_dataset`: prompt-only, for GRPO-style trainers: conversational `prompt`, the gold answer in `solution`
  (a plain number string, what TRL's math rewards read), and the problem's `terms`.
- `arithmetic_sft_dataset`: prompt-completion, for supervised training: each completion is one valid reasoning path
  drawn uniformly among the problem's distinct paths.
- `programming_dataset`: prompt-only: conversational `prompt`, the stdin/stdout cases in `tests` (a JSON string of the
  normalised `stdio` spec, what `CodeReward` reads), and the problem's `kind` and `param`.
- `programming_sft_dataset`: prompt-completion: each completion is one of the problem's listed correct programs,
  drawn uniformly.
"""

import json
import random

from datasets import Dataset

from . import programming
from .arithmetic import MAX_VALUE, NUM_TERMS, ArithmeticProblem, enumerate_paths, generate_problems
from .programming import NUM_CASES, ProgrammingProblem, enumerate_programs


def arithmetic_dataset(
    num_problems: int, seed: int = 0, split: str = "train", num_terms: int = NUM_TERMS, max_value: int = MAX_VALUE
) -> Dataset:
    """`num_problems` unique problems of the given split, with columns `prompt`, `solution` and `terms`."""
    problems = generate_problems(num_problems, seed, split, num_terms, max_value)
    return Dataset.from_list([{"prompt": p.prompt, "solution": p.solution, "terms": list(p.terms)} for p in problems])


def problems_from_dataset(dataset) -> list[ArithmeticProblem]:
    """The problems of a dataset built by `arithmetic_dataset` (read from its `terms` column)."""
    if "terms" not in dataset.column_names:
        raise ValueError(f"Expected a `terms` column (from arithmetic_dataset), got columns {dataset.column_names}.")
    return [ArithmeticProblem(tuple(terms)) for terms in dataset["terms"]]


def arithmetic_sft_dataset(
    num_examples: int, seed: int = 0, num_terms: int = NUM_TERMS, max_value: int = MAX_VALUE
) -> Dataset:
    """`num_examples` train-split problems (repeats allowed) with one uniformly drawn valid path each.

    Columns: `prompt` and `completion` (conversational), `solution`. Never contains a held-out problem.
    """
    problems = generate_problems(num_examples, seed, "train", num_terms, max_value, unique=False)
    rng = random.Random(f"{seed}/sft-paths")
    rows = []
    for problem in problems:
        completion = rng.choice(list(enumerate_paths(problem).values()))
        rows.append(
            {
                "prompt": problem.prompt,
                "completion": [{"role": "assistant", "content": completion}],
                "solution": problem.solution,
            }
        )
    return Dataset.from_list(rows)


def _programming_row(problem: ProgrammingProblem) -> dict:
    return {
        "prompt": problem.prompt,
        "tests": json.dumps(problem.tests),
        "kind": problem.kind,
        "param": str(problem.param),
    }


def programming_dataset(
    num_problems: int, seed: int = 0, split: str = "train", num_cases: int = NUM_CASES, unique: bool = True
) -> Dataset:
    """`num_problems` programming problems of the given split, with columns `prompt`, `tests`, `kind` and `param`.

    The train split has 306 unique problems and the test split 34; pass `unique=False` to draw more (with repeats).
    """
    problems = programming.generate_problems(num_problems, seed, split, num_cases, unique)
    return Dataset.from_list([_programming_row(p) for p in problems])


def programming_problems_from_dataset(dataset) -> list[ProgrammingProblem]:
    """The problems of a dataset built by `programming_dataset` (read from its `kind`, `param` and `tests` columns)."""
    missing = {"kind", "param", "tests"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"Expected the columns kind, param and tests (from programming_dataset); {sorted(missing)} missing from "
            f"{dataset.column_names}."
        )
    problems = []
    for kind, param, tests in zip(dataset["kind"], dataset["param"], dataset["tests"]):
        spec = json.loads(tests) if isinstance(tests, str) else tests
        value = int(param) if param.lstrip("-").isdigit() else param
        cases = tuple((case["input"], case["output"]) for case in spec["cases"])
        problems.append(ProgrammingProblem(kind, value, cases))
    return problems


def programming_sft_dataset(num_examples: int, seed: int = 0, num_cases: int = NUM_CASES) -> Dataset:
    """`num_examples` train-split problems (repeats allowed), each with one uniformly drawn listed program.

    Columns: `prompt` and `completion` (conversational), `tests`, `kind`, `param`. Never contains a held-out problem.
    """
    problems = programming.generate_problems(num_examples, seed, "train", num_cases, unique=False)
    rng = random.Random(f"{seed}/sft-programs")
    rows = []
    for problem in problems:
        completion = rng.choice(list(enumerate_programs(problem).values()))
        rows.append(_programming_row(problem) | {"completion": [{"role": "assistant", "content": completion}]})
    return Dataset.from_list(rows)
