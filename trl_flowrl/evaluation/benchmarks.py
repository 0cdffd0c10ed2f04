r"""Benchmarks: a set of prompts, a grader, and optionally a reasoning-path identifier.

A `Benchmark` is everything the evaluation needs to know about a task:

- `dataset`: rows with a `prompt` column, conversational (a list of `{"role", "content"}` messages, rendered with
  the model's chat template) or a plain string (used as is), plus whatever columns the grader reads;
- `grader`: `grader(completion: str, row: dict) -> Grade | bool`, or with `batched=True`
  `grader(completions: list[str], rows: list[dict]) -> list[Grade | bool]` (for graders that parallelise, like the
  math-verify process pool). A `Grade` carries an outcome label (`"wrong"`, `"timeout"`, ...) and the extracted
  final answer besides correctness, for the outcome counts and the distinct-answers metric;
- `path_id` (optional): `path_id(completion, row) -> hashable | None`, the canonical id of the reasoning path a
  completion takes (None when it cannot be identified), for counting distinct correct paths exactly.

Built-in benchmarks, by name (`load_benchmark`): the six math sets of the FlowRL paper, HumanEval+ and LiveCodeBench
(datasets from `trl_flowrl.data`, graded by `trl_flowrl.rewards`), the two embedded tasks of `trl_flowrl.tasks`
(`arithmetic`, with exact reasoning-path ids; `programs`, with programs identified by their syntax tree), and any
local dataset file or `save_to_disk` folder with a grader chosen by name (`math`, `code`, `boxed`, or
`module:function` naming a TRL reward function). Every adapter imports its module only when used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any


MATH_BENCHMARKS = {
    "math500": "MATH-500 (HuggingFaceH4/MATH-500)",
    "aime24": "AIME 2024",
    "aime25": "AIME 2025",
    "amc23": "AMC 2023 (math-ai/amc23)",
    "minerva": "Minerva math (math-ai/minervamath)",
    "olympiadbench": "OlympiadBench (math-ai/olympiadbench)",
}
CODE_BENCHMARKS = {
    "humanevalplus": "HumanEval+ (evalplus/humanevalplus)",
    "livecodebench": "LiveCodeBench (parquet mirror)",
}
EMBEDDED_BENCHMARKS = {
    "arithmetic": "the embedded arithmetic task, held-out problems, exact path ids",
    "programs": "the embedded programming task, held-out problems, run in the local sandbox, programs by syntax tree",
}
GRADER_NAMES = ("math", "code", "boxed")

DEFAULT_MAX_NEW_TOKENS = 8192  # the FlowRL paper's evaluation length
ARITHMETIC_MAX_NEW_TOKENS = 80  # a path of the embedded task is well under 80 characters (= tokens)
PROGRAMS_MAX_NEW_TOKENS = 128  # the longest listed completion (fenced program) is 102 characters (= tokens)

# Columns whose value, when present, is kept as the problem's id in the per-problem results.
ID_COLUMNS = ("id", "unique_id", "problem_id", "task_id", "question_id")


@dataclass(frozen=True)
class Grade:
    """The grade of one completion: correct or not, an outcome label, and the extracted final answer if any."""

    correct: bool
    outcome: str | None = None
    answer: str | None = None

    @classmethod
    def coerce(cls, value) -> Grade:
        """A `Grade` from what a grader returned: a `Grade`, a bool, or the number 0 or 1."""
        if isinstance(value, Grade):
            return value
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)) or _is_numpy_bool(value):
            correct = bool(value)
            return cls(correct, "correct" if correct else "wrong")
        raise TypeError(f"A grader must return a Grade, a bool, or 0/1; got {value!r} ({type(value).__name__}).")


def _is_numpy_bool(value) -> bool:
    return type(value).__name__ == "bool_"


@dataclass
class Benchmark:
    """A dataset of prompts, a grader, and an optional reasoning-path identifier (see the module docstring).

    Args:
        name: short name, used as the key in results and in file names.
        dataset: a `datasets.Dataset` or a list of dict rows, each with a `prompt`.
        grader: `(completion, row) -> Grade | bool`, or batched (see `batched`). A grader may declare the columns it
            reads in a `required_columns` attribute; they are checked here.
        batched: whether `grader` takes lists of completions and rows.
        path_id: `(completion, row) -> hashable | None`; None when paths cannot be identified for this task.
        max_new_tokens: this benchmark's default generation length (`evaluate` may override it).
        description: one line for reports.
    """

    name: str
    dataset: Any
    grader: Callable
    batched: bool = False
    path_id: Callable[[str, dict], Hashable | None] | None = None
    max_new_tokens: int | None = None
    description: str = ""
    rows: list[dict] = field(init=False, repr=False)

    def __post_init__(self):
        if not self.name or not re.fullmatch(r"[\w.+-]+", self.name):
            raise ValueError(
                f"A benchmark name must be non-empty letters, digits, '_', '.', '+', '-'; got {self.name!r}."
            )
        self.rows = self.dataset.to_list() if hasattr(self.dataset, "to_list") else [dict(r) for r in self.dataset]
        if not self.rows:
            raise ValueError(f"Benchmark {self.name!r} has no rows.")
        columns = set(self.rows[0])
        required = ("prompt", *getattr(self.grader, "required_columns", ()))
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"Benchmark {self.name!r} lacks the column(s) {missing} (it has {sorted(columns)}): every benchmark "
                "needs a `prompt` (conversational messages or a string), and its grader reads the others."
            )
        if not callable(self.grader):
            raise TypeError(f"The grader of {self.name!r} must be callable, got {type(self.grader).__name__}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list:
        return [row["prompt"] for row in self.rows]

    def head(self, limit: int | None) -> Benchmark:
        """The same benchmark restricted to its first `limit` problems (all of them when `limit` is None)."""
        if limit is None or limit >= len(self.rows):
            return self
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}.")
        return replace(self, dataset=self.rows[:limit])

    def grade(self, completions: Sequence[Sequence[str]]) -> list[list[Grade]]:
        """Grades of `completions[i][j]`, sample j of problem i; same shape as `completions`."""
        if len(completions) != len(self.rows):
            raise ValueError(f"Got completions for {len(completions)} problems, {self.name!r} has {len(self.rows)}.")
        flat = [(text, row) for samples, row in zip(completions, self.rows) for text in samples]
        if self.batched:
            raw = list(self.grader([t for t, _ in flat], [r for _, r in flat]))
            if len(raw) != len(flat):
                raise ValueError(
                    f"The grader of {self.name!r} returned {len(raw)} grades for {len(flat)} completions."
                )
        else:
            raw = [self.grader(text, row) for text, row in flat]
        grades = [Grade.coerce(g) for g in raw]
        out, cursor = [], 0
        for samples in completions:
            out.append(grades[cursor : cursor + len(samples)])
            cursor += len(samples)
        return out

    def path_ids(self, completions: Sequence[Sequence[str]]) -> list[list[Hashable | None]] | None:
        """Path ids of `completions[i][j]` (same shape), or None when this benchmark has no path identifier."""
        if self.path_id is None:
            return None
        return [[self.path_id(text, row) for text in samples] for samples, row in zip(completions, self.rows)]


def prompt_text(prompt) -> str:
    """The problem statement of a prompt: the last user message of a conversation, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    user = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    content = user[-1] if user else (prompt[-1].get("content", "") if prompt else "")
    if isinstance(content, list):  # multimodal content blocks
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content)


def problem_id(row: dict) -> Any:
    """The row's own id (the first of `ID_COLUMNS` it has), or None."""
    for column in ID_COLUMNS:
        if column in row and row[column] is not None:
            return row[column]
    return None


# -- graders --------------------------------------------------------------------------------------------------------


_BOXED_TOKENS = re.compile(r"(?P<open>\\boxed\{)|[{}]")  # no escapes: every brace counts, as this grader always did


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` with balanced braces, or None. Linear time (one pass)."""
    from trl_flowrl.rewards.math_reward import last_box

    box = last_box(text, _BOXED_TOKENS)
    return None if box is None else box[1].strip()


def _normalize_answer(answer: str) -> str:
    answer = answer.strip().strip("$").strip().rstrip(".")
    return re.sub(r"\s+", "", answer)


def _as_number(answer: str) -> Fraction | None:
    try:
        return Fraction(answer.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def boxed_grader(solution_column: str = "solution") -> Callable[[str, dict], Grade]:
    r"""Exact match of the last `\boxed{...}` with the row's solution: no dependency, no equivalence checking.

    Answers are compared after dropping `$`, a trailing period and whitespace; two numbers (integers, decimals,
    `a/b`, thousands separators) compare by value. `\frac12` against `1/2` is *wrong* here: use the `math` grader
    for anything but plain numbers and literal strings. Outcomes: `correct`, `wrong`, `no_answer`.
    """

    def grade(completion: str, row: dict) -> Grade:
        answer = _last_boxed(completion)
        if answer is None:
            return Grade(False, "no_answer", None)
        got, gold = _normalize_answer(answer), _normalize_answer(str(row[solution_column]))
        got_number, gold_number = _as_number(got), _as_number(gold)
        if got_number is not None and gold_number is not None:
            correct = got_number == gold_number
        else:
            correct = got == gold
        return Grade(correct, "correct" if correct else "wrong", answer)

    grade.required_columns = (solution_column,)
    return grade


def math_grader(
    solution_column: str = "solution", **verifier_kwargs
) -> Callable[[list[str], list[dict]], list[Grade]]:
    """Batched grader: math-verify equivalence through `trl_flowrl.rewards.MathVerifier` (killable worker processes).

    `verifier_kwargs` go to `MathVerifier` (answer_format, num_workers, timeouts). The outcome is the verifier's
    (`correct`, `wrong`, `no_answer`, `timeout`, `error`, `gold_unparseable`, `infra_error`: no worker could start or
    take the request, not the answer's fault, reported apart as the code grader does); only `correct` counts as correct.
    """
    from trl_flowrl.rewards import MathVerifier, Outcome

    verifier = MathVerifier(**verifier_kwargs)

    def grade(completions: list[str], rows: list[dict]) -> list[Grade]:
        results = verifier.grade(completions, [str(row[solution_column]) for row in rows])
        return [Grade(g.outcome is Outcome.CORRECT, g.outcome.value, g.answer) for g in results]

    grade.required_columns = (solution_column,)
    return grade


def code_grader(tests_column: str = "tests", **reward_kwargs) -> Callable[[list[str], list[dict]], list[Grade]]:
    """Batched grader: the completion's last code block against the row's tests (`trl_flowrl.rewards.CodeReward`).

    Correct means every test passed. Outcomes: `passed`, `failed`, `timeout`, `no_code`, `infra_error` (the sandbox
    failed, not the program: reported apart, counted as not correct). `reward_kwargs` go to `CodeReward` (executor,
    timeouts, max_tests); scoring is all-or-nothing.

    A program that occurs several times against the same tests (the same code in its last block, whatever the prose
    around it) runs once and every copy gets that verdict: many samples of a trained model are copies (pass@k at
    large k would otherwise run the same program dozens of times per problem). A program whose outcome depends on
    chance or on timing therefore gets one verdict for all its copies.
    """
    from trl_flowrl.rewards import CodeReward
    from trl_flowrl.rewards.code_reward import extract_code
    from trl_flowrl.rewards.math_reward import completion_text

    reward = CodeReward(scoring="all_or_nothing", tests_column=tests_column, **reward_kwargs)

    def grade(completions: list[str], rows: list[dict]) -> list[Grade]:
        tests = [row[tests_column] for row in rows]

        def grading_key(i, completion, test):
            try:
                code = extract_code(completion_text(completion))
            except TypeError:  # not a completion the reward reads: graded on its own, as the reward decides
                code = ("unread", i)
            return code, json.dumps(test, sort_keys=True, default=str)

        keys = [grading_key(i, c, t) for i, (c, t) in enumerate(zip(completions, tests))]
        first = {}  # key -> index of its first occurrence, the one that runs
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        runs = list(first.values())
        reports = dict(zip(runs, reward.grade([completions[i] for i in runs], [tests[i] for i in runs])))
        grades = []
        for report in (reports[first[key]] for key in keys):
            if report is None:
                grades.append(Grade(False, "no_code"))
            elif report.infra_error:
                grades.append(Grade(False, "infra_error"))
            elif report.all_passed:
                grades.append(Grade(True, "passed"))
            else:
                grades.append(Grade(False, "timeout" if report.timed_out else "failed"))
        return grades

    grade.required_columns = (tests_column,)
    return grade


def reward_function_grader(
    reward_func: Callable, threshold: float = 1.0, conversational: bool = True
) -> Callable[[list[str], list[dict]], list[Grade]]:
    """Batched grader from any TRL reward function `reward_func(prompts, completions, **columns) -> list[float]`.

    A completion is correct when its reward is >= `threshold` (default 1.0: all-or-nothing rewards). Completions are
    passed conversationally (`[{"role": "assistant", "content": text}]`) when `conversational` and the prompt is a
    conversation, as TRL does; every dataset column but `prompt` is passed as a keyword list. A reward of None
    (the function declined to score) gives outcome `unscored`. `log_metric` and `log_extra` are accepted and
    dropped; `trainer_state` and `completion_ids` are not passed.
    """

    def grade(completions: list[str], rows: list[dict]) -> list[Grade]:
        prompts = [row["prompt"] for row in rows]
        wrapped = [
            [{"role": "assistant", "content": text}] if conversational and not isinstance(p, str) else text
            for text, p in zip(completions, prompts)
        ]
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"} if rows else {}
        rewards = reward_func(
            prompts=prompts,
            completions=wrapped,
            log_metric=lambda name, value: None,
            log_extra=lambda name, values: None,
            **columns,
        )
        if len(rewards) != len(completions):
            raise ValueError(
                f"The reward function returned {len(rewards)} rewards for {len(completions)} completions."
            )
        return [
            Grade(False, "unscored") if r is None else Grade(r >= threshold, "correct" if r >= threshold else "wrong")
            for r in rewards
        ]

    return grade


def load_grader(spec: str | Callable, **kwargs) -> tuple[Callable, bool]:
    """A grader and whether it is batched, from a name (`math`, `code`, `boxed`) or `module:function`.

    `module:function` must name a TRL reward function (or a class of them, built with no arguments) and is wrapped
    by `reward_function_grader`. `kwargs` go to the named grader's factory.
    """
    if callable(spec):
        return spec, False
    if spec == "math":
        return math_grader(**kwargs), True
    if spec == "code":
        return code_grader(**kwargs), True
    if spec == "boxed":
        return boxed_grader(**kwargs), False
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Cannot import the reward function {spec!r}: {error}") from error
        if inspect.isclass(target):
            target = target()
        return reward_function_grader(target, **kwargs), True
    raise ValueError(
        f"Unknown grader {spec!r}: use one of {GRADER_NAMES} or `module:function` (a TRL reward function)."
    )


# -- built-in benchmarks --------------------------------------------------------------------------------------------


def available_benchmarks() -> list[str]:
    """The names `load_benchmark` knows (a local dataset path is accepted too)."""
    return [*MATH_BENCHMARKS, *CODE_BENCHMARKS, *EMBEDDED_BENCHMARKS]


def _canonical(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


def _eval_dataset(name: str):
    """The TRL prompt dataset of a built-in evaluation set (`trl_flowrl.data`), from the hub or its cache."""
    from trl_flowrl.data import CODE_EVAL_DATASETS, MATH_EVAL_DATASETS

    return {**MATH_EVAL_DATASETS, **CODE_EVAL_DATASETS}[name]()


def arithmetic_benchmark(
    num_problems: int = 200, seed: int = 0, num_terms: int | None = None, max_value: int | None = None
) -> Benchmark:
    """Held-out problems of the embedded arithmetic task (`trl_flowrl.tasks`, its default size unless given),
    graded by the project's math reward (the one the recipes train with), with exact reasoning-path ids."""
    from trl_flowrl.tasks import MAX_VALUE, NUM_TERMS, ArithmeticProblem, arithmetic_dataset, path_id

    def identify(completion: str, row: dict) -> str | None:
        return path_id(ArithmeticProblem(tuple(row["terms"])), completion)

    dataset = arithmetic_dataset(
        num_problems,
        seed=seed,
        split="test",
        num_terms=NUM_TERMS if num_terms is None else num_terms,
        max_value=MAX_VALUE if max_value is None else max_value,
    )
    return Benchmark(
        "arithmetic",
        dataset,
        math_grader(),
        batched=True,
        path_id=identify,
        max_new_tokens=ARITHMETIC_MAX_NEW_TOKENS,
        description=EMBEDDED_BENCHMARKS["arithmetic"],
    )


def programs_benchmark(num_problems: int | None = None, seed: int = 0, **reward_kwargs) -> Benchmark:
    """Held-out problems of the embedded programming task (`trl_flowrl.tasks.programming`; all 37 when
    `num_problems` is None), run against their tests in the local sandbox (`code_grader`, the reward the code recipe
    trains with), with programs identified by their syntax tree (`program_id`). `reward_kwargs` go to `CodeReward`."""
    from trl_flowrl.tasks import program_id, programming, programming_dataset

    available = len(programming.all_problem_keys("test"))
    if num_problems is None:
        num_problems = available
    elif not 1 <= num_problems <= available:
        raise ValueError(f"The programs task has {available} held-out problems: ask for 1 to {available} (None: all).")

    def identify(completion: str, row: dict) -> str | None:
        return program_id(completion)

    return Benchmark(
        "programs",
        programming_dataset(num_problems, seed=seed, split="test"),
        code_grader(**reward_kwargs),
        batched=True,
        path_id=identify,
        max_new_tokens=PROGRAMS_MAX_NEW_TOKENS,
        description=EMBEDDED_BENCHMARKS["programs"],
    )


DATASET_EXTENSIONS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}


def load_local_dataset(path: str):
    """A dataset from a `.json`, `.jsonl`, `.parquet` or `.csv` file, or a `save_to_disk` folder.

    A folder holding several splits must have a `test` split (which is used) or only one.
    """
    import datasets

    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
    else:
        extension = os.path.splitext(path)[1].lower().lstrip(".")
        builder = DATASET_EXTENSIONS.get(extension)
        if builder is None:
            raise ValueError(
                f"Cannot read {path!r}: use a .json, .jsonl, .parquet or .csv file or a save_to_disk folder."
            )
        if os.path.getsize(path) == 0:  # `datasets` raises a bare StopIteration on an empty file
            raise ValueError(f"The dataset file {path!r} is empty: it needs rows with a `prompt` column.")
        loaded = datasets.load_dataset(builder, data_files=path, split="train")
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1 and "test" not in loaded:
            raise ValueError(f"{path!r} holds several splits {list(loaded)}: save the one to evaluate on its own.")
        loaded = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
    return loaded


def _looks_like_a_path(name: str) -> bool:
    """A name no built-in benchmark has: a path separator, a leading `.` or `~`, or a dataset file extension."""
    extension = os.path.splitext(name)[1].lower().lstrip(".")
    return "/" in name or os.sep in name or name.startswith((".", "~")) or extension in DATASET_EXTENSIONS


def load_benchmark(
    name: str, grader: str | Callable | None = None, limit: int | None = None, **grader_kwargs
) -> Benchmark:
    """A built-in benchmark by name, or a local dataset (a path) graded by `grader` (default `math`).

    `limit` keeps the first problems only. For built-in names `grader` overrides the default grader (math sets:
    `math`, code sets: `code`); `grader_kwargs` go to the grader factory.
    """
    key = _canonical(name)
    name = os.path.expanduser(name)
    if not os.path.exists(name) and _looks_like_a_path(name):
        raise FileNotFoundError(
            f"No dataset file or folder {name!r} (looked for {os.path.abspath(name)}): check the path, or use a built-in "
            f"benchmark {available_benchmarks()}."
        )
    if os.path.exists(name):
        fn, batched = load_grader(grader or "math", **grader_kwargs)
        stem = os.path.splitext(os.path.basename(os.path.normpath(name)))[0]
        benchmark = Benchmark(
            re.sub(r"[^\w.+-]+", "_", stem) or "local",
            load_local_dataset(name),
            fn,
            batched=batched,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
            description=f"local dataset {name}",
        )
    elif key in MATH_BENCHMARKS or key in CODE_BENCHMARKS:
        default = "math" if key in MATH_BENCHMARKS else "code"
        fn, batched = load_grader(grader or default, **grader_kwargs)
        benchmark = Benchmark(
            key,
            _eval_dataset(key),
            fn,
            batched=batched,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
            description={**MATH_BENCHMARKS, **CODE_BENCHMARKS}[key],
        )
    elif key in EMBEDDED_BENCHMARKS or key == "embedded":
        benchmark = programs_benchmark() if key == "programs" else arithmetic_benchmark()
        if grader is not None:
            fn, batched = load_grader(grader, **grader_kwargs)
            benchmark = replace(benchmark, grader=fn, batched=batched)
    else:
        raise ValueError(
            f"Unknown benchmark {name!r}: use one of {available_benchmarks()}, or the path of a local dataset file."
        )
    return benchmark.head(limit)
