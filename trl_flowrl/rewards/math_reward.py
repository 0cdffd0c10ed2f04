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
  (0.0, or `None` so that TRL skips the sample);
- a worker that dies while grading (a crash, the OOM killer) or answers garbage: the answer is graded again, once
  (a fresh worker replaces the dead one). If that grades it, that grade counts: the first death was the
  machine's (memory taken by the trainer, a stray kill). If the answer kills that worker too, the death is the
  answer's doing (a memory blow-up), graded `error` like a math-verify exception (scored 0.0 by default), so such
  answers are not skipped forever. A worker that cannot start, or whose retry cannot run, is an infrastructure
  error, `infra_error`, skipped by default like `CodeReward`'s: the answer was never judged, so a 0 would teach the
  policy that a possibly correct answer is wrong. (Sustained memory pressure from the trainer that kills the worker
  twice on one answer is then taken as the answer's.) A math-verify timeout or exception on an answer happens again
  on the same answer: the answer's property;
- gold answers that are words: math-verify reads a bare word as a product of one-letter symbols, so any anagram
  would match it (`None`, a missing solution made a string, equals `neon`). A gold is `gold_unparseable` when it is
  missing (`None`, empty), has no math in it, or has a *bare word*, two or more letters in a row outside LaTeX commands,
  `\text{}`-like groups and `_{}` subscripts, that math-verify kept as symbols. Kept: `\frac{\sqrt{3}}{2}`, `x^2+1`,
  `a+b`, `x y`, `\pi`, `\sin x`, intervals, `x=2`; words the parser drops (`5 cm`, `90 degrees`, `3 and 4`); and
  `\text{Evelyn}`, one symbol compared whole. Rejected: `neon`, `None`, `yes`, `no solution`, `nan`, but also
  `xy` or `2ab`, which cannot be told from words: write products with a space or `\cdot`;
- answer extraction in linear time (one pass over the braces), so a long completion of unclosed `\boxed{` costs
  milliseconds, not minutes;
- completions that are not text (`None`, `[]`, a dict, a message without content) scored as `no_answer`, with a
  warning, instead of raising.

The worker pool (`_procpool`): the hard deadline covers sending the request as well as the reply (a stopped worker
cannot hold the trainer), and workers die with the trainer's process, even mid-request.

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
    TIMEOUT = "timeout"  # math-verify's own timeout, or the worker killed at the hard deadline: the answer's property
    ERROR = "error"  # math-verify raised on this answer, or it killed a worker twice: the answer's property too
    GOLD_UNPARSEABLE = "gold_unparseable"  # the dataset's answer has no math in it: a data problem
    INFRA_ERROR = "infra_error"  # no worker could start, or take the request, to grade it: not judged


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

# One token per opener (`\boxed{`, `\fbox{`), escape (a backslash and the next character, unless that character starts
# an opener: `\\boxed{3}` still holds a box) and brace.
_BOX_TOKENS = re.compile(r"(?P<open>\\(?:boxed|fbox)\s*\{)|\\(?!\\(?:boxed|fbox)\s*\{)[\s\S]|[{}]")
_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)


def last_box(text: str, tokens: re.Pattern = _BOX_TOKENS) -> tuple[int, str] | None:
    r"""Position and content of the last complete box, or None: the box that starts last among those whose braces
    balance (an unclosed one is skipped).

    `tokens` finds openers (group `open`, ending in `{`), braces and whatever else must be skipped (escapes). One pass
    with a stack of open braces, so linear in `len(text)`: scanning to the end from each opener was quadratic on a
    completion of unclosed `\boxed{`.
    """
    best, stack = None, []  # stack: per open brace, (opener start, content start) for a box, None for a group
    for token in tokens.finditer(text):
        if token.group("open"):
            stack.append((token.start(), token.end()))
        elif token.group() == "{":
            stack.append(None)
        elif token.group() == "}" and stack:
            box = stack.pop()
            if box is not None and (best is None or box[0] > best[0]):
                best = (box[0], text[box[1] : token.start()])
    return best


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
        boxed = last_box(text)
        if boxed is not None:
            candidates.append(boxed)
    if answer_format in ("auto", "answer_line"):
        matches = list(_ANSWER_LINE.finditer(text))
        if matches:
            start = matches[-1].end()
            end = text.find("\n", start)
            line = text[start : end if end != -1 else len(text)]
            inner = last_box(line)
            candidates.append((matches[-1].start(), inner[1] if inner else line))
    if not candidates:
        return None
    answer = _strip_math_delimiters(max(candidates, key=lambda c: c[0])[1])
    return answer or None


_TEXT_GROUP = re.compile(r"\\(?:text[a-z]*|mathrm|mbox|operatorname\*?)\s*\{[^{}]*\}|_\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def bare_words(gold: str) -> list[str]:
    r"""Runs of two or more letters in `gold` outside LaTeX commands (`\frac`, `\pi`), `\text{}`-like groups and
    `_{...}` subscripts: `bare_words("no solution") == ["no", "solution"]`, `bare_words(r"\frac{\pi}{2}") == []`.

    math-verify reads such a run as a product of one-letter symbols; the worker grades a gold with one as
    `gold_unparseable` unless the parser dropped the words (a unit, "and") and kept no symbol.
    """
    return _WORD.findall(_COMMAND.sub(" ", _TEXT_GROUP.sub(" ", gold)))


def _missing(gold) -> bool:
    return gold is None or isinstance(gold, bool) or not str(gold).strip()


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

    def grade(self, completions: Sequence[str | None], golds: Sequence) -> list[MathGrade]:
        """Grade `completions[i]` against `golds[i]`; returns one `MathGrade` per pair, in order.

        A completion that is not a string (None included) is `NO_ANSWER`; a gold that is None, a bool or blank is
        `GOLD_UNPARSEABLE`; other golds (numbers) are read as `str(gold)`. Neither goes to a worker.
        """
        if len(completions) != len(golds):
            raise ValueError(f"Got {len(completions)} completions but {len(golds)} gold answers.")
        grades: list[MathGrade | None] = [None] * len(golds)
        requests, positions = [], []
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            if _missing(gold):
                grades[i] = MathGrade(Outcome.GOLD_UNPARSEABLE, detail=f"missing gold answer ({gold!r})")
            elif not isinstance(completion, str):
                grades[i] = MathGrade(Outcome.NO_ANSWER, detail=f"malformed completion ({type(completion).__name__})")
            else:
                positions.append(i)
                requests.append(
                    {
                        "completion": completion,
                        "gold": str(gold),
                        "answer_format": self.answer_format,
                        "parse_timeout": self.parse_timeout,
                        "verify_timeout": self.verify_timeout,
                    }
                )
        replies = self.pool.map(requests, self.hard_timeout) if requests else []
        # A worker that died on a request (or answered garbage) is given it again once, on another worker: the answer
        # itself may have killed it, or the machine (see the module docstring).
        retried = [k for k, reply in enumerate(replies) if isinstance(reply, WorkerCrashed) and reply.during_request]
        if retried:
            again = self.pool.map([requests[k] for k in retried], self.hard_timeout)
            for k, reply in zip(retried, again):
                replies[k] = reply
        for k, (i, reply) in enumerate(zip(positions, replies)):
            grades[i] = self._grade_of(reply, second_try=k in retried)
        return grades

    def _grade_of(self, reply: dict | Exception, second_try: bool = False) -> MathGrade:
        if isinstance(reply, WorkerTimeout):
            return MathGrade(Outcome.TIMEOUT, detail=f"worker killed after {self.hard_timeout:g} s")
        if isinstance(reply, WorkerCrashed):
            if reply.during_request and second_try:
                return MathGrade(Outcome.ERROR, detail=f"the answer killed two workers; the second: {reply}")
            return MathGrade(Outcome.INFRA_ERROR, detail=f"no worker could grade it: {reply}")
        return MathGrade(
            outcome=Outcome(reply["outcome"]),
            answer=reply.get("answer"),
            answer_parsed=reply.get("answer_parsed"),
            gold_parsed=reply.get("gold_parsed"),
            detail=reply.get("detail", ""),
        )

    def grade_one(self, completion: str, gold: str) -> MathGrade:
        return self.grade([completion], [gold])[0]


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a conversational list of messages (the last one's content; a
    message whose content is None has none). Raises TypeError on anything else."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, list):  # multimodal content blocks
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        if content is None or isinstance(content, str):
            return content or ""
    raise TypeError(
        f"A completion must be a string or a list of messages, got {type(completion).__name__}: {completion!r:.80}."
    )


class MathAccuracyReward:
    """TRL reward function: math-verify equivalence of the final answer with the `solution` column.

    Args:
        answer_format, num_workers, parse_timeout, verify_timeout, hard_timeout: see `MathVerifier`.
        correct_score: score of a correct answer.
        wrong_score: score of a wrong answer and of a completion with no final answer (or that is not text at all:
            None, an empty list, a dict; logged once per type).
        timeout_score: score when verification timed out; `None` makes TRL skip the sample.
        error_score: score when math-verify raised on the answer, or the answer killed (or garbled) a worker twice in
            a row (it would again: the answer's property); `None` skips.
        infra_error_score: score when no worker could start or take the request (after a worker died on it: the
            retry), so the answer was never judged; `None` (the default, as `CodeReward`'s) makes TRL skip the sample
            rather than score a possibly correct answer 0. A worker that died on the answer once and then graded it
            gives that grade.
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
        infra_error_score: float | None = None,
    ):
        self.verifier = MathVerifier(answer_format, num_workers, parse_timeout, verify_timeout, hard_timeout)
        self.scores = {
            Outcome.CORRECT: correct_score,
            Outcome.WRONG: wrong_score,
            Outcome.NO_ANSWER: wrong_score,
            Outcome.TIMEOUT: timeout_score,
            Outcome.ERROR: error_score,
            Outcome.GOLD_UNPARSEABLE: gold_unparseable_score,
            Outcome.INFRA_ERROR: infra_error_score,
        }
        self.metric_prefix = metric_prefix
        self._warned_golds: set[str] = set()
        self._warned_completions: set[str] = set()

    def __call__(
        self,
        completions: list,
        solution: list[str],
        log_metric: Callable[[str, float], None] | None = None,
        log_extra: Callable[[str, list], None] | None = None,
        **kwargs,
    ) -> list[float | None]:
        texts = []
        for completion in completions:
            try:
                texts.append(completion_text(completion))
            except TypeError as error:  # graded `no_answer` by the verifier, never a crash of the reward step
                texts.append(None)
                if type(completion).__name__ not in self._warned_completions:
                    self._warned_completions.add(type(completion).__name__)
                    logger.warning("A malformed completion is scored as no_answer: %s", error)
        grades = self.verifier.grade(texts, list(solution))
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
