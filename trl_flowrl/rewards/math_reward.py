r"""Math answer checking by equivalence (math-verify), bounded by killable worker processes.

`MathVerifier` grades (completion, gold answer) pairs and returns one `MathGrade` per pair, with an `Outcome` that keeps
apart what a plain 0/1 reward mixes up: a correct or wrong answer, a completion with no final answer, a verification
that timed out, a parser error, and a gold answer that cannot be parsed. `MathAccuracyReward` wraps it as a TRL reward
function with a score per outcome and per-batch metrics.

This extends `trl.rewards.accuracy_reward` (same math-verify extraction settings: LaTeX, `\boxed{}` first, units
stripped; but LaTeX shorthand such as `\frac12` is repaired instead of scored wrong) with what it lacks here:

- the DAPO answer format, a last line `Answer: ...`, besides `\boxed{...}`;
- a hard time bound that holds off the main thread: math-verify's `signal.alarm` timeouts only work on a main thread
  (TRL's function silently disables them elsewhere, and a thread cannot be interrupted), so parsing and verification
  run in a small pool of worker processes (two by default, created once, reused) where those timeouts work, and a
  worker that has not answered by the hard deadline is SIGKILLed and replaced;
- timeouts, parser errors and unparseable gold answers reported as such, with the score of each chosen by the user
  (0.0, or `None` so that TRL skips the sample).

Not handled: answers that are not mathematical expressions (free text, multiple-choice letters other than as symbols),
several answers in one completion (only the last `\boxed{}` or `Answer:` line counts), and equivalence beyond what
math-verify decides.

Example:
```python
from trl_flowrl.rewards import MathAccuracyReward, MathVerifier

verifier = MathVerifier()
grades = verifier.grade([r"so \boxed{\frac{2}{4}}", "...\nAnswer: 0.5", "no idea"], ["1/2", r"\frac12", "3"])
[g.outcome.value for g in grades]  # ['correct', 'correct', 'no_answer']

reward = MathAccuracyReward(timeout_score=None)  # skip samples whose verification timed out
trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset_with_solution_column, ...)
```
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._procpool import WorkerCrashed, WorkerPool, WorkerTimeout


logger = logging.getLogger(__name__)

ANSWER_FORMATS = ("auto", "boxed", "answer_line")


class Outcome(str, enum.Enum):
    """What grading one completion found."""

    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"  # no `\boxed{}` / `Answer:` line, or nothing parseable in it: the model's fault
    TIMEOUT = "timeout"  # math-verify's own timeout, or the worker killed at the hard deadline
    ERROR = "error"  # a parser/verifier exception or a crashed worker: not the model's fault
    GOLD_UNPARSEABLE = "gold_unparseable"  # the dataset's answer has no math in it: a data problem


@dataclass(frozen=True)
class MathGrade:
    """The grade of one (completion, gold) pair.

    `answer` is the extracted answer text, `answer_parsed` and `gold_parsed` the strings of what math-verify parsed,
    `detail` a short reason for timeouts and errors.
    """

    outcome: Outcome
    answer: str | None = None
    answer_parsed: str | None = None
    gold_parsed: str | None = None
    detail: str = ""


# -- answer extraction (pure string scanning, linear time: also safe to run in the trainer's process) ---------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)


def _last_boxed(text: str) -> tuple[int, str] | None:
    """Position and content of the last complete `\\boxed{...}` (balanced braces), or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            if text[i] == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return match.start(), text[match.end() : i - 1]
    return None


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip().strip("*").strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    return answer.rstrip(".").strip()


def extract_answer(text: str, answer_format: str = "auto") -> str | None:
    r"""The final answer of a completion, as LaTeX text without `$` delimiters, or None when there is none.

    - `"boxed"`: the content of the last `\boxed{...}` (or `\fbox{...}`) with balanced braces.
    - `"answer_line"`: the rest of the line after the last `Answer:` (case-insensitive), as the DAPO template asks;
      a `\boxed{}` inside that line is unwrapped.
    - `"auto"`: whichever of the two comes last in the text.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}.")
    candidates = []
    if answer_format in ("auto", "boxed"):
        boxed = _last_boxed(text)
        if boxed is not None:
            candidates.append(boxed)
    if answer_format in ("auto", "answer_line"):
        matches = list(_ANSWER_LINE.finditer(text))
        if matches:
            start = matches[-1].end()
            end = text.find("\n", start)
            line = text[start : end if end != -1 else len(text)]
            inner = _last_boxed(line)
            candidates.append((matches[-1].start(), inner[1] if inner else line))
    if not candidates:
        return None
    answer = _strip_math_delimiters(max(candidates, key=lambda c: c[0])[1])
    return answer or None


def gold_to_latex(answer: str) -> str:
    r"""Wrap a bare answer (`34`, `\frac{1}{2}`, `(2, 3)`) in `\boxed{}` so math-verify parses it as one expression."""
    answer = _strip_math_delimiters(str(answer))
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


# -- the verifier ---------------------------------------------------------------------------------------------------

_pools: dict[int, WorkerPool] = {}
_pools_lock = threading.Lock()


def _shared_pool(num_workers: int) -> WorkerPool:
    """One pool per worker count, shared by every verifier of this process."""
    with _pools_lock:
        if num_workers not in _pools:
            _pools[num_workers] = WorkerPool("trl_flowrl.rewards._math_worker", num_workers)
        return _pools[num_workers]


class MathVerifier:
    """Grades completions against gold answers in killable worker processes.

    Args:
        answer_format: `"auto"` (default), `"boxed"` or `"answer_line"`; see `extract_answer`.
        num_workers: worker processes grading at once. Workers are shared by all verifiers with the same count.
        parse_timeout: math-verify's own timeout for parsing one answer, in whole seconds (>= 1).
        verify_timeout: math-verify's own timeout for one comparison, in whole seconds (>= 1).
        hard_timeout: seconds after which a worker that has not answered is killed and the pair graded `TIMEOUT`.
            Defaults to `2 * parse_timeout + 2 * verify_timeout + 2`.

    Safe to call from any thread and from any process (a forked child starts its own workers).
    """

    def __init__(
        self,
        answer_format: str = "auto",
        num_workers: int = 2,
        parse_timeout: int = 5,
        verify_timeout: int = 5,
        hard_timeout: float | None = None,
    ):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}.")
        for name, value in (("parse_timeout", parse_timeout), ("verify_timeout", verify_timeout)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a whole number of seconds >= 1 (signal.alarm), got {value!r}.")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.answer_format = answer_format
        self.num_workers = num_workers
        self.parse_timeout = int(parse_timeout)
        self.verify_timeout = int(verify_timeout)
        self.hard_timeout = float(hard_timeout or 2 * parse_timeout + 2 * verify_timeout + 2)
        if self.hard_timeout <= 0:
            raise ValueError(f"hard_timeout must be > 0, got {hard_timeout!r}.")

    @property
    def pool(self) -> WorkerPool:
        return _shared_pool(self.num_workers)

    def grade(self, completions: Sequence[str], golds: Sequence[str]) -> list[MathGrade]:
        """Grade `completions[i]` against `golds[i]`; returns one `MathGrade` per pair, in order."""
        if len(completions) != len(golds):
            raise ValueError(f"Got {len(completions)} completions but {len(golds)} gold answers.")
        requests = [
            {
                "completion": str(completion),
                "gold": str(gold),
                "answer_format": self.answer_format,
                "parse_timeout": self.parse_timeout,
                "verify_timeout": self.verify_timeout,
            }
            for completion, gold in zip(completions, golds)
        ]
        grades = []
        for reply in self.pool.map(requests, self.hard_timeout):
            if isinstance(reply, WorkerTimeout):
                grades.append(MathGrade(Outcome.TIMEOUT, detail=f"worker killed after {self.hard_timeout:g} s"))
            elif isinstance(reply, WorkerCrashed):
                grades.append(MathGrade(Outcome.ERROR, detail=f"worker crashed: {reply}"))
            else:
                grades.append(
                    MathGrade(
                        outcome=Outcome(reply["outcome"]),
                        answer=reply.get("answer"),
                        answer_parsed=reply.get("answer_parsed"),
                        gold_parsed=reply.get("gold_parsed"),
                        detail=reply.get("detail", ""),
                    )
                )
        return grades

    def grade_one(self, completion: str, gold: str) -> MathGrade:
        return self.grade([completion], [gold])[0]


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a conversational list of messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content blocks
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        return str(content)
    raise TypeError(f"A completion must be a string or a list of messages, got {type(completion).__name__}.")


class MathAccuracyReward:
    """TRL reward function: math-verify equivalence of the final answer with the `solution` column.

    Args:
        answer_format, num_workers, parse_timeout, verify_timeout, hard_timeout: see `MathVerifier`.
        correct_score: score of a correct answer.
        wrong_score: score of a wrong answer and of a completion with no final answer.
        timeout_score: score when verification timed out; `None` makes TRL skip the sample.
        error_score: score on a parser/verifier error or a crashed worker; `None` skips the sample.
        gold_unparseable_score: score when the gold answer cannot be parsed (logged as a warning); `None` skips.
        metric_prefix: prefix of the metrics logged through TRL's `log_metric` (the fraction of each outcome in the
            batch, e.g. `math_reward/timeout`).

    Returns one score per completion. Also logs the extracted answer and the outcome as completion-table columns.
    """

    __name__ = "math_accuracy"

    def __init__(
        self,
        answer_format: str = "auto",
        correct_score: float = 1.0,
        wrong_score: float = 0.0,
        timeout_score: float | None = 0.0,
        error_score: float | None = 0.0,
        gold_unparseable_score: float | None = None,
        num_workers: int = 2,
        parse_timeout: int = 5,
        verify_timeout: int = 5,
        hard_timeout: float | None = None,
        metric_prefix: str = "math_reward",
    ):
        self.verifier = MathVerifier(answer_format, num_workers, parse_timeout, verify_timeout, hard_timeout)
        self.scores = {
            Outcome.CORRECT: correct_score,
            Outcome.WRONG: wrong_score,
            Outcome.NO_ANSWER: wrong_score,
            Outcome.TIMEOUT: timeout_score,
            Outcome.ERROR: error_score,
            Outcome.GOLD_UNPARSEABLE: gold_unparseable_score,
        }
        self.metric_prefix = metric_prefix
        self._warned_golds: set[str] = set()

    def __call__(
        self,
        completions: list,
        solution: list[str],
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        **kwargs,
    ) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        grades = self.verifier.grade(texts, [str(s) for s in solution])
        for grade, gold in zip(grades, solution):
            if grade.outcome is Outcome.GOLD_UNPARSEABLE and str(gold) not in self._warned_golds:
                self._warned_golds.add(str(gold))
                logger.warning("Gold answer %r cannot be parsed by math-verify (%s).", gold, grade.detail)
        if log_metric is not None and grades:
            counts = Counter(grade.outcome for grade in grades)
            for outcome in Outcome:
                log_metric(f"{self.metric_prefix}/{outcome.value}", counts[outcome] / len(grades))
        if log_extra is not None:
            log_extra("math_answer", [grade.answer for grade in grades])
            log_extra("math_outcome", [grade.outcome.value for grade in grades])
        return [self.scores[grade.outcome] for grade in grades]
