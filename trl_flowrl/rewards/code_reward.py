"""Code reward: run a completion's program against a problem's tests in a sandbox.

The program is the last fenced code block of the completion. Tests come in three styles, normalised by
`normalize_tests` from the formats the datasets use:

- `stdio` (DeepCoder, LiveCodeBench stdin problems, Codeforces, TACO/APPS without `fn_name`): each case runs the
  program in a fresh sandboxed process with the case's input on stdin; stdout must match the expected output as
  `stdout_matches` says (LiveCodeBench's rule: line by line, tokens equal as strings or as exact decimals, so never
  a different integer; plus whitespace-insensitivity and a 1e-6 tolerance where the expected token is not an
  integer). Expected outputs never enter the sandbox.
- `functional` (LiveCodeBench LeetCode-style problems, PrimeIntellect `function_call`, TACO/APPS with `fn_name`): one
  process defines the program, then calls `Solution().<fn_name>` (or a top-level `<fn_name>`) on each case's
  arguments and writes the JSON-encoded results to a file; the comparison (`values_equal`) happens here, in the
  trainer's process. A case with no recorded result (the program exited, crashed or timed out first) fails.
- `assert` (HumanEval+): the test code runs in a judge process that never loads the program; the program runs in a
  candidate process forked before the judge reads the tests and a per-run nonce from stdin, and answers the judge's
  calls of `<entry_point>` (and of its other top-level functions the test uses, like HumanEval's `poly`) with plain
  values in a strict encoding (exact builtin types; numpy scalars as their Python value), decoded by the judge into
  fresh builtin objects. The program cannot read or trace the judge (it is not dumpable, and the program has no
  stdin or stdout), so it can neither see the expected values nor forge the verdict, `<nonce> passed`, which the
  judge prints after `check` returned. An object whose `__eq__` is always true, an `int` subclass or a patched
  `builtins.exec` only act in the candidate process, and an early exit or a crash fails. Not supported (the test
  fails): tests that pass the candidate non-plain arguments (functions, objects) or look at how it mutated its
  arguments, and functions returning other types (a numpy array, an iterator, an instance of a class).

Any uncaught exception, non-zero exit, timeout or limit is a failure. An executor failure (`sandbox_error`, which
includes a program starved of CPU, see `code_sandbox`) is an infrastructure error, not a wrong answer: it is counted
apart and scored `infra_error_score` (default `None`, so TRL skips the sample). Nothing a program does makes the
reward raise: an exception of the executor itself is logged and scored as an infrastructure error too.

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
from decimal import Decimal, InvalidOperation, localcontext

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

FLOAT_TOLERANCE = 1e-6
_TOLERANCE = Decimal(str(FLOAT_TOLERANCE))
_INTEGER = re.compile(r"[+-]?\d+")


def _token_equal(got: str, expected: str) -> bool:
    if got == expected:
        return True
    try:
        g, e = Decimal(got), Decimal(expected)
    except (InvalidOperation, ValueError):
        return False  # a word, compared exactly
    if not (g.is_finite() and e.is_finite()):
        return False
    try:
        with localcontext() as context:
            context.prec = 50
            if g == e:
                return True  # the same number written differently: "1.0" for "1", as LiveCodeBench's grader allows
            if _INTEGER.fullmatch(expected):
                return False  # an integer answer must be that very integer
            return abs(g - e) <= _TOLERANCE * max(Decimal(1), abs(e))
    except ArithmeticError:  # an exponent beyond what decimal handles
        return False


def stdout_matches(got: str, expected: str) -> bool:
    """Whether a program's stdout matches the expected output.

    The rule (LiveCodeBench's stdin grader, which DeepCoder also uses, with two lenient points): both outputs are
    compared line by line, ignoring blank lines and whitespace around and between tokens (lenient point 1: the
    reference also compares whitespace inside a line of words); a token matches if it is the same string or the same
    number (compared exactly as decimals, so `1.0` matches `1` but `123456790.0` never matches `123456789`, nor
    `1e-7` `0`, nor `1.2345678901234568e16` `12345678901234567`). Where the expected token is not an integer, a
    number within `FLOAT_TOLERANCE` (1e-6) absolute or relative also matches (lenient point 2: the reference compares
    decimals exactly; TACO-style graders and Codeforces checkers accept such an error on real-valued answers).
    """
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
    """JSON values equal; where the expected number is a float, a float within 1e-6 (absolute or relative) also
    matches; an expected integer must be matched exactly (tuples are already lists)."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return got is expected or got == expected and type(got) is type(expected)
    if isinstance(got, int | float) and isinstance(expected, int | float):
        if got == expected:
            return True
        if isinstance(expected, int):
            return False
        return math.isclose(got, expected, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
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

# Two processes. The judge (this program's first process) forks the candidate process before it reads anything, then
# reads the nonce and the tests from stdin (the candidate has no stdin nor stdout by then, and cannot read or trace
# the judge: it is not dumpable), runs the test code and writes the verdict on stdout. The candidate process loads the
# solution and answers the judge's calls with values in a strict, tagged JSON encoding (exact builtin types only),
# which the judge decodes into fresh builtin objects: no object of the solution ever reaches the test code, so
# `__eq__` tricks, int subclasses and patched builtins only act in the candidate's own process.
_ASSERT_HARNESS = """\
import builtins, ctypes, json, os, sys

sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.getcwd()]
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)
try:
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem or fd of the judge
except (OSError, AttributeError):
    pass


def encode(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind.__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return encode(value.item())
    raise TypeError(f"a {kind.__name__} cannot leave the candidate process")


SEQUENCES = {"tuple": tuple, "set": set, "frozenset": frozenset}


def decode(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [decode(v) for v in value]
    if kind is dict and len(value) == 1:
        ((tag, body),) = value.items()
        if tag in SEQUENCES and type(body) is list:
            return SEQUENCES[tag](decode(v) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k): decode(v) for k, v in body}
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
    raise ValueError("malformed value from the candidate process")


def line_of(message):
    return json.dumps(message).encode() + b"\\n"


to_candidate, to_judge = os.pipe(), os.pipe()
candidate = os.fork()
if candidate == 0:
    os.close(to_candidate[1])
    os.close(to_judge[0])
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    requests, replies = os.fdopen(to_candidate[0], "rb"), os.fdopen(to_judge[1], "wb")
    namespace = {"__name__": "__solution__"}
    try:
        with open("prelude.py") as f:
            prelude = f.read()
        with open("solution.py") as f:
            source = f.read()
        exec(compile(prelude + source, "solution.py", "exec"), namespace)
        names = [name for name, value in list(namespace.items()) if type(name) is str and callable(value)]
        hello = {"loaded": True, "names": names}
    except BaseException as exc:
        hello = {"loaded": False, "error": type(exc).__name__}
    try:
        replies.write(line_of(hello))
        replies.flush()
        for request in requests:
            try:
                call = json.loads(request)
                value = namespace[call["name"]](*decode(call["args"]), **decode(call["kwargs"]))
                reply = {"value": encode(value)}
            except BaseException as exc:
                reply = {"error": type(exc).__name__}
            replies.write(line_of(reply))
            replies.flush()
    finally:
        os._exit(0)

os.close(to_candidate[0])
os.close(to_judge[1])
requests, replies = os.fdopen(to_candidate[1], "wb"), os.fdopen(to_judge[0], "rb")
nonce, _, payload = sys.stdin.buffer.read().partition(b"\\n")
spec = json.loads(payload)


def receive():
    line = replies.readline(1 << 26)
    if not line.endswith(b"\\n"):
        raise RuntimeError("the candidate process stopped answering")
    return json.loads(line)


def remote(name):
    def call(*args, **kwargs):
        requests.write(line_of({"name": name, "args": encode(list(args)), "kwargs": encode(kwargs)}))
        requests.flush()
        reply = receive()
        if "error" in reply:
            error = getattr(builtins, str(reply["error"]), None)
            if isinstance(error, type) and issubclass(error, Exception):
                raise error("raised by the candidate")
            raise RuntimeError(f"the candidate raised {reply['error']}")
        return decode(reply["value"])

    call.__name__ = call.__qualname__ = name
    return call


hello = receive()
if not hello.get("loaded"):
    sys.exit(f"the solution did not load: {hello.get('error')}")
namespace = {"__name__": "__test__"}
for name in hello.get("names", []):
    # Helpers of the solution the test code may call (e.g. HumanEval's `poly`); the test's own names and the
    # builtins win.
    if type(name) is str and name.isidentifier() and not hasattr(builtins, name):
        namespace[name] = remote(name)
exec(compile(spec["prelude"], "prelude.py", "exec"), namespace)
exec(compile(spec["test"], "test.py", "exec"), namespace)
namespace["check"](remote(spec["entry_point"]))
os.kill(candidate, 9)
sys.stdout.write(nonce.decode() + " passed\\n")
sys.stdout.flush()
"""


def _execute(executor: CodeExecutor, code: str, **kwargs) -> ExecutionResult:
    """`executor.run`, with an exception turned into an infrastructure error: the reward never raises for a program."""
    try:
        return executor.run(code, **kwargs)
    except Exception as exc:
        logger.exception("The code executor raised; the program is scored as an infrastructure error.")
        return ExecutionResult("sandbox_error", detail=f"the executor raised {type(exc).__name__}: {exc}")


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
    prelude = spec.get("prelude") or PRELUDE
    timeout = min(max_total_timeout, timeout_per_test * max(1, total))
    if style == "functional":
        cases = {"fn_name": spec["fn_name"], "args": [c["args"] for c in spec["cases"]], "prelude": PRELUDE}
        result = _execute(
            executor,
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
    # assert style: the verdict is the judge's last line, `<nonce> passed` (see _ASSERT_HARNESS)
    nonce = secrets.token_hex(16)
    payload = {"test": spec["test"], "entry_point": spec["entry_point"], "prelude": prelude}
    result = _execute(
        executor,
        _ASSERT_HARNESS,
        stdin=nonce + "\n" + json.dumps(payload),
        files={"solution.py": code, "prelude.py": prelude},
        timeout_s=timeout,
    )
    if result.infra_error:
        return TestReport(0, 1, infra_error=True, details=[result.detail])
    lines = result.stdout.splitlines()
    ok = result.status == "ok" and bool(lines) and lines[-1] == f"{nonce} passed"
    return TestReport(int(ok), 1, timed_out=result.status == "timeout", details=[result.status])


def _run_stdio(code, spec, executor, timeout_per_test, stop_at_first_failure) -> TestReport:
    report = TestReport(0, len(spec["cases"]))
    for case in spec["cases"]:
        result = _execute(executor, code, stdin=case["input"], timeout_s=timeout_per_test)
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
            cases, capped at `max_total_timeout`. For a `LocalSandbox` it is the CPU-time budget and the wall-clock
            limit, extended for a program the machine starves of CPU (see `code_sandbox`).
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
            try:
                text = completion_text(completion)
            except TypeError as error:  # None, [], a dict...: no program to run, never a crash of the reward step
                logger.warning("A completion that is not text is scored as having no code: %s", error)
                return None
            code = extract_code(text)
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
