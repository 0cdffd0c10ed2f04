"""The arithmetic task as `datasets.Dataset`s in TRL's formats.

- `arithmetic_dataset`: prompt-only, for GRPO-style trainers: conversational `prompt`, the gold answer in `solution`
  (a plain number string, what TRL's math rewards read), and the problem's `terms`.
- `arithmetic_sft_dataset`: prompt-completion, for supervised training: each completion is one valid reasoning path
  drawn uniformly among the problem's distinct paths.
"""

import random

from datasets import Dataset

from .arithmetic import MAX_VALUE, NUM_TERMS, ArithmeticProblem, enumerate_paths, generate_problems


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
