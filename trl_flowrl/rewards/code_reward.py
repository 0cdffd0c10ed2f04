"""Code reward: run a completion's program against a problem's tests in a sandbox.

The program is the last fenced code block of the completion. Tests come in three styles, normalised by
`normalize_tests` from the formats the datasets use:

- `stdio` (DeepCoder, LiveCodeBench stdin problems, Codeforces, TACO/APPS without `fn_name`): each case runs the
  program in a fresh sandboxed process with the case's input on stdin; stdout must match the expected output
  (line by line, whitespace-insensitive, decimals compared to 1e-6). Expected outputs never enter the sandbox.
- `functional` (LiveCodeBench LeetCode-style problems, PrimeIntellect `function_call`, TACO/APPS with `fn_name`): one
  process defines the program, then calls `Solution().<fn_name>` (or a top-level `<fn_name>`) on each case's
  arguments and writes the JSON-encoded results to a file; the comparison happens here, in the trainer's process.
  A case with no recorded result (the program exited, crashed or timed out first) fails.
- `assert` (HumanEval+): the program, then the problem's test code, then `check(<entry_point>)`; it passes only if a
  completion record carrying a per-run random nonce is written after `check` returned, so an early `sys.exit(0)` or
  `os._exit(0)` cannot pass.

Any uncaught exception, non-zero exit, timeout or limit is a failure. An executor failure (`sandbox_error`) is an
infrastructure error, not a wrong answer: it is counted apart and scored `infra_error_score` (default `None`, so
TRL skips the sample).

Example:
```python
from trl_flowrl.rewards import CodeReward, LocalSandbox, SandboxLimits

reward = CodeReward(LocalSandbox(SandboxLimits(timeout_s=6), max_concurrency=2), scoring="all_or_nothing")
trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset_with_tests_column, ...)
```
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .code_sandbox import CodeExecutor, ExecutionResult, LocalSandbox
from .math_reward import completion_text


logger = logging.getLogger(__name__)

SCORINGS = ("all_or_nothing", "fraction")

# Imports the common competitive-programming harnesses make available to function-style solutions.
PRELUDE = (
    "from typing import *\n"
    "import math, itertools, collections, heapq, bisect, functools, string, re, sys\n"
    "from collections import defaultdict, Counter, deque\n"
    "from functools import lru_cache, reduce, cache\n"
    "from itertools import accumulate, permutations, combinations, product\n"
    "from heapq import heappush, heappop, heapify\n"
    "from bisect import bisect_left, bisect_right\n"
)

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The content of the last complete fenced code block (```lang ... ```), or None."""
    blocks = _FENCE.findall(text)
    if not blocks or not blocks[-1].strip():
        return None
    return blocks[-1]


# -- test specifications -------------------------------------------------------------------------------------------


def _maybe_json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _as_text(value) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def normalize_tests(raw) -> dict:
    """Convert a tests value (object or JSON string) to `{"style": ..., ...}`.

    Accepted inputs: an already normalised spec; TACO/APPS `{"inputs": [...], "outputs": [...], "fn_name"?}`;
    LiveCodeBench `[{"input", "output", "testtype": "stdin" | "functional", "metadata"?}]` (with
    `metadata["func_name"]` for functional tests); PrimeIntellect `[{"type": "stdin_stdout" | "function_call",
    "input", "output", "fn_name"?}]`; Codeforces-style `[{"input", "output"}]`.

    Raises:
        ValueError: on a format it does not know, or a functional test without a function name.
    """
    tests = _maybe_json(raw)
    if isinstance(tests, dict) and "style" in tests:
        if tests["style"] not in ("stdio", "functional", "assert"):
            raise ValueError(f"Unknown test style {tests['style']!r}.")
        return tests
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError("TACO/APPS tests have different numbers of inputs and outputs.")
        if tests.get("fn_name"):
            cases = [
                {"args": _maybe_json(i) if isinstance(_maybe_json(i), list) else [_maybe_json(i)], "expected": o}
                for i, o in zip(tests["inputs"], tests["outputs"])
            ]
            return {"style": "functional", "fn_name": tests["fn_name"], "cases": cases, "unwrap": True}
        cases = [{"input": _as_text(i), "output": _as_text(o)} for i, o in zip(tests["inputs"], tests["outputs"])]
        return {"style": "stdio", "cases": cases}
    if isinstance(tests, list) and tests and all(isinstance(t, dict) and "input" in t for t in tests):
        first = tests[0]
        kind = first.get("testtype") or first.get("type") or "stdin"
        if kind in ("stdin", "stdin_stdout"):
            return {
                "style": "stdio",
                "cases": [{"input": _as_text(t["input"]), "output": _as_text(t["output"])} for t in tests],
            }
        if kind == "functional":  # LiveCodeBench: one JSON value per line of `input`
            metadata = _maybe_json(first.get("metadata") or {})
            fn_name = (metadata or {}).get("func_name") or first.get("fn_name")
            if not fn_name:
                raise ValueError("LiveCodeBench functional tests need metadata['func_name'].")
            cases = [
                {
                    "args": [json.loads(line) for line in t["input"].split("\n") if line.strip()],
                    "expected": json.loads(t["output"]),
                }
                for t in tests
            ]
            return {"style": "functional", "fn_name": fn_name, "cases": cases, "unwrap": False}
        if kind == "function_call":  # PrimeIntellect: `input` is the argument list
            fn_name = first.get("fn_name")
            if not fn_name:
                raise ValueError("PrimeIntellect function_call tests need 'fn_name'.")
            cases = []
            for t in tests:
                args = _maybe_json(t["input"])
                cases.append(
                    {"args": args if isinstance(args, list) else [args], "expected": _maybe_json(t["output"])}
                )
            return {"style": "functional", "fn_name": fn_name, "cases": cases, "unwrap": True}
        raise ValueError(f"Unknown test type {kind!r}.")
    raise ValueError(f"Unrecognised tests format: {str(raw)[:200]!r}")


def count_tests(spec: dict) -> int:
    return 1 if spec["style"] == "assert" else len(spec["cases"])


# -- comparisons ---------------------------------------------------------------------------------------------------


def _token_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    if not any(c in a + b for c in ".eE"):  # integers and words compare exactly
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)


def stdout_matches(got: str, expected: str) -> bool:
    """Line-by-line, whitespace-insensitive comparison; decimal tokens compared to a 1e-6 tolerance."""
    got_lines = [line.split() for line in got.strip().splitlines()]
    exp_lines = [line.split() for line in expected.strip().splitlines()]
    got_lines = [line for line in got_lines if line]
    exp_lines = [line for line in exp_lines if line]
    if len(got_lines) != len(exp_lines):
        return False
    return all(
        len(g) == len(e) and all(_token_equal(a, b) for a, b in zip(g, e)) for g, e in zip(got_lines, exp_lines)
    )


def values_equal(got, expected) -> bool:
    """JSON values equal, with floats compared to a 1e-6 tolerance (and tuples already lists)."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return got is expected or got == expected and type(got) is type(expected)
    if isinstance(got, int | float) and isinstance(expected, int | float):
        return got == expected or math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(values_equal(g, e) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(values_equal(got[k], expected[k]) for k in got)
    return got == expected


# -- harnesses -------------------------------------------------------------------------------------------------------

_FUNCTIONAL_HARNESS = """\
import json, sys
sys.setrecursionlimit(100000)
with open("cases.json") as f:
    spec = json.load(f)
namespace = {"__name__": "__solution__"}
with open("solution.py") as f:
    source = f.read()
exec(compile(spec["prelude"] + source, "solution.py", "exec"), namespace)
name = spec["fn_name"]
if isinstance(namespace.get("Solution"), type) and hasattr(namespace["Solution"], name):
    target = getattr(namespace["Solution"](), name)
else:
    target = namespace[name]

def jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(type(value).__name__)

out = open("results.jsonl", "w")
for i, args in enumerate(spec["args"]):
    try:
        line = json.dumps({"i": i, "value": target(*args)}, default=jsonable)
    except BaseException as exc:
        line = json.dumps({"i": i, "error": type(exc).__name__})
    out.write(line + "\\n")
    out.flush()
"""

_ASSERT_HARNESS = """\
import json, sys
nonce = sys.stdin.readline().strip()
namespace = {"__name__": "__solution__"}
with open("solution.py") as f:
    source = f.read()
with open("tests.json") as f:
    spec = json.load(f)
exec(compile(spec["prelude"] + source, "solution.py", "exec"), namespace)
exec(compile(spec["test"], "test.py", "exec"), namespace)
namespace["check"](namespace[spec["entry_point"]])
with open("done.json", "w") as f:
    json.dump({"nonce": nonce}, f)
"""


@dataclass
class TestReport:
    """Result of one program against one test spec."""

    passed: int
    total: int
    infra_error: bool = False
    timed_out: bool = False
    details: list[str] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total and not self.infra_error


def run_tests(
    code: str,
    tests,
    executor: CodeExecutor,
    timeout_per_test: float = 6.0,
    max_total_timeout: float = 60.0,
    stop_at_first_failure: bool = False,
) -> TestReport:
    """Run `code` against `tests` (any format `normalize_tests` accepts) with `executor`."""
    spec = normalize_tests(tests)
    style = spec["style"]
    if style == "stdio":
        return _run_stdio(code, spec, executor, timeout_per_test, stop_at_first_failure)
    total = count_tests(spec)
    timeout = min(max_total_timeout, timeout_per_test * max(1, total))
    if style == "functional":
        cases = {"fn_name": spec["fn_name"], "args": [c["args"] for c in spec["cases"]], "prelude": PRELUDE}
        result = executor.run(
            _FUNCTIONAL_HARNESS,
            files={"solution.py": code, "cases.json": json.dumps(cases)},
            fetch=("results.jsonl",),
            timeout_s=timeout,
        )
        if result.infra_error:
            return TestReport(0, total, infra_error=True, details=[result.detail])
        values = {}
        for line in result.files.get("results.jsonl", "").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("i"), int) and "value" in record:
                values.setdefault(record["i"], record["value"])
        passed = 0
        for i, case in enumerate(spec["cases"]):
            expected = case["expected"]
            if i in values and (
                values_equal(values[i], expected)
                or spec.get("unwrap")
                and isinstance(expected, list)
                and len(expected) == 1
                and values_equal(values[i], expected[0])
            ):
                passed += 1
        return TestReport(passed, total, timed_out=result.status == "timeout", details=[result.status])
    # assert style
    nonce = secrets.token_hex(16)
    payload = {"test": spec["test"], "entry_point": spec["entry_point"], "prelude": spec.get("prelude") or PRELUDE}
    result = executor.run(
        _ASSERT_HARNESS,
        stdin=nonce + "\n",
        files={"solution.py": code, "tests.json": json.dumps(payload)},
        fetch=("done.json",),
        timeout_s=timeout,
    )
    if result.infra_error:
        return TestReport(0, 1, infra_error=True, details=[result.detail])
    try:
        done = json.loads(result.files.get("done.json", "null"))
    except ValueError:
        done = None
    ok = result.status == "ok" and isinstance(done, dict) and done.get("nonce") == nonce
    return TestReport(int(ok), 1, timed_out=result.status == "timeout", details=[result.status])


def _run_stdio(code, spec, executor, timeout_per_test, stop_at_first_failure) -> TestReport:
    report = TestReport(0, len(spec["cases"]))
    for case in spec["cases"]:
        result: ExecutionResult = executor.run(code, stdin=case["input"], timeout_s=timeout_per_test)
        if result.infra_error:
            report.infra_error = True
            report.details.append(result.detail)
            return report
        ok = result.status == "ok" and stdout_matches(result.stdout, case["output"])
        report.passed += ok
        report.timed_out |= result.status == "timeout"
        report.details.append(result.status if result.status != "ok" else ("pass" if ok else "wrong output"))
        if not ok and stop_at_first_failure:
            break
    return report


# -- the TRL reward --------------------------------------------------------------------------------------------------


class CodeReward:
    """TRL reward function: run each completion's last code block against the row's tests.

    Args:
        executor: a `LocalSandbox` (default: `LocalSandbox()`), a `SandboxFusionExecutor`, or anything with the same
            `run` method.
        scoring: `"all_or_nothing"` (1.0 only if every test passes, as in the FlowRL/DeepCoder recipes; stops at the
            first failing stdio case) or `"fraction"` (the fraction of tests passed).
        timeout_per_test: seconds per stdio case; function-call and assert programs get this times the number of
            cases, capped at `max_total_timeout`.
        max_tests: run at most this many cases per problem (the first ones); `None` runs them all.
        no_code_score: score of a completion without a fenced code block.
        infra_error_score: score when the executor failed (not the program); `None` makes TRL skip the sample.
        tests_column: the dataset column holding the tests (TRL passes every column as a keyword argument).
        metric_prefix: prefix of the per-batch metrics logged through TRL's `log_metric`.
    """

    __name__ = "code_reward"

    def __init__(
        self,
        executor: CodeExecutor | None = None,
        scoring: str = "all_or_nothing",
        timeout_per_test: float = 6.0,
        max_total_timeout: float = 60.0,
        max_tests: int | None = None,
        no_code_score: float = 0.0,
        infra_error_score: float | None = None,
        tests_column: str = "tests",
        metric_prefix: str = "code_reward",
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}.")
        if timeout_per_test <= 0 or max_total_timeout <= 0:
            raise ValueError("timeout_per_test and max_total_timeout must be > 0.")
        if max_tests is not None and max_tests < 1:
            raise ValueError(f"max_tests must be >= 1 or None, got {max_tests}.")
        self.executor = executor if executor is not None else LocalSandbox()
        self.scoring = scoring
        self.timeout_per_test = timeout_per_test
        self.max_total_timeout = max_total_timeout
        self.max_tests = max_tests
        self.no_code_score = no_code_score
        self.infra_error_score = infra_error_score
        self.tests_column = tests_column
        self.metric_prefix = metric_prefix

    def _limit(self, spec: dict) -> dict:
        if self.max_tests is None or spec["style"] == "assert" or len(spec["cases"]) <= self.max_tests:
            return spec
        return {**spec, "cases": spec["cases"][: self.max_tests]}

    def grade(self, completions: Sequence, tests: Sequence) -> list[TestReport | None]:
        """One `TestReport` per completion (None when it has no code block)."""
        if len(completions) != len(tests):
            raise ValueError(f"Got {len(completions)} completions but {len(tests)} test specs.")

        def one(pair):
            completion, raw_tests = pair
            code = extract_code(completion_text(completion))
            if code is None:
                return None
            spec = self._limit(normalize_tests(raw_tests))
            return run_tests(
                code,
                spec,
                self.executor,
                self.timeout_per_test,
                self.max_total_timeout,
                stop_at_first_failure=self.scoring == "all_or_nothing",
            )

        workers = max(1, int(getattr(self.executor, "max_concurrency", 2)))
        with ThreadPoolExecutor(workers, thread_name_prefix="trl-flowrl-code") as pool:
            return list(pool.map(one, zip(completions, tests)))

    def score(self, report: TestReport | None) -> float | None:
        if report is None:
            return self.no_code_score
        if report.infra_error:
            return self.infra_error_score
        if self.scoring == "all_or_nothing":
            return 1.0 if report.all_passed else 0.0
        return report.passed / report.total if report.total else 0.0

    def __call__(
        self,
        completions: list,
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        **kwargs,
    ) -> list[float | None]:
        if self.tests_column not in kwargs:
            raise KeyError(
                f"CodeReward needs a {self.tests_column!r} dataset column (got columns {sorted(kwargs)}); "
                "set tests_column= to the column holding the tests."
            )
        reports = self.grade(completions, kwargs[self.tests_column])
        if log_metric is not None and reports:
            n = len(reports)
            log_metric(f"{self.metric_prefix}/all_passed", sum(bool(r and r.all_passed) for r in reports) / n)
            log_metric(f"{self.metric_prefix}/no_code", sum(r is None for r in reports) / n)
            log_metric(f"{self.metric_prefix}/infra_error", sum(bool(r and r.infra_error) for r in reports) / n)
            log_metric(f"{self.metric_prefix}/timeout", sum(bool(r and r.timed_out) for r in reports) / n)
        if log_extra is not None:
            log_extra("tests_passed", [None if r is None else f"{r.passed}/{r.total}" for r in reports])
        return [self.score(r) for r in reports]
