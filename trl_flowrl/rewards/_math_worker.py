"""Worker process for math verification: one JSON request per stdin line, one JSON reply per stdout line.

Runs as `python -m trl_flowrl.rewards._math_worker`, started by `WorkerPool` (the loop is `_procpool.serve`, which also
ends this process with its parent). Requests are graded on the main thread, so math-verify's `signal.alarm` timeouts
work here; they are the first bound, and the pool's SIGKILL at the request's hard deadline is the second. A request is `{"completion", "gold", "answer_format", "parse_timeout", "verify_timeout"}`; the
reply is `{"outcome", "answer", "gold_parsed", "answer_parsed", "detail"}` with `outcome` one of the values of
`trl_flowrl.rewards.math_reward.Outcome`.
"""

import logging
import sys
from itertools import product

from trl_flowrl.rewards._procpool import serve


def _grade(request: dict) -> dict:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    from sympy import Basic, MatrixBase

    from trl_flowrl.rewards.math_reward import bare_words, extract_answer, gold_to_latex

    parse_timeout = int(request["parse_timeout"])
    verify_timeout = int(request["verify_timeout"])
    # As `trl.rewards.accuracy_reward`: LaTeX only, boxed first, units stripped. Unlike it, shorthand such as
    # `\frac12` or `\sqrt2` is repaired rather than scored wrong (math-verify's default normalisation).
    config = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True, malformed_operators=True, nits=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )
    ]
    reply = {"answer": None, "gold_parsed": None, "answer_parsed": None, "detail": ""}

    def is_math(items):
        return any(isinstance(item, Basic | MatrixBase) for item in items)

    try:
        gold = parse(
            gold_to_latex(request["gold"]),
            extraction_config=config,
            extraction_mode="first_match",
            parsing_timeout=parse_timeout,
            raise_on_error=True,
        )
    except TimeoutException:
        return {**reply, "outcome": "timeout", "detail": "gold parsing timed out"}
    except Exception as exc:  # noqa: BLE001 - any parser failure on the gold is a gold problem
        return {**reply, "outcome": "gold_unparseable", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    reply["gold_parsed"] = str(gold[0]) if gold else None
    if not is_math(gold):
        return {**reply, "outcome": "gold_unparseable", "detail": f"no math expression in gold {request['gold']!r}"}
    # A bare word is read as a product of one-letter symbols (`None` = `neon`): unless the parser dropped it (units,
    # "and"), the gold is not math. See `math_reward.bare_words`.
    words = bare_words(request["gold"])
    if words and any(getattr(item, "free_symbols", None) for item in gold if isinstance(item, Basic | MatrixBase)):
        detail = f"gold {request['gold']!r} has bare words {words[:3]}, read as products of one-letter symbols"
        return {**reply, "outcome": "gold_unparseable", "detail": detail[:300]}

    answer = extract_answer(request["completion"], request["answer_format"])
    reply["answer"] = answer
    if answer is None:
        return {**reply, "outcome": "no_answer"}
    try:
        parsed = parse(
            gold_to_latex(answer),
            extraction_config=config,
            extraction_mode="first_match",
            parsing_timeout=parse_timeout,
            raise_on_error=True,
        )
    except TimeoutException:
        return {**reply, "outcome": "timeout", "detail": "answer parsing timed out"}
    except Exception as exc:  # noqa: BLE001
        return {**reply, "outcome": "error", "detail": f"parse: {type(exc).__name__}: {exc}"[:300]}
    if not parsed:
        return {**reply, "outcome": "no_answer", "detail": "nothing parseable in the extracted answer"}
    reply["answer_parsed"] = str(parsed[0])

    # `verify` tries every (gold, answer) pair and returns True on the first match; doing the pairs here keeps a
    # timeout or an error on one pair apart from a plain mismatch.
    timed_out = errored = False
    for g, t in product(gold, parsed):
        try:
            if verify(g, t, timeout_seconds=verify_timeout, raise_on_error=True):
                return {**reply, "outcome": "correct"}
        except TimeoutException:
            timed_out = True
        except Exception as exc:  # noqa: BLE001
            errored = True
            reply["detail"] = f"verify: {type(exc).__name__}: {exc}"[:300]
    if timed_out:
        return {**reply, "outcome": "timeout", "detail": "verification timed out"}
    if errored:
        return {**reply, "outcome": "error"}
    return {**reply, "outcome": "wrong"}


def _answer(request: dict) -> dict:
    try:
        return _grade(request)
    except RecursionError:
        return {"outcome": "error", "detail": "RecursionError"}
    except Exception as exc:  # noqa: BLE001 - the worker must answer every request
        return {"outcome": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}


def main() -> None:
    # Timeouts and parse failures are reported in the reply; math-verify's own warnings would only be noise.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    sys.setrecursionlimit(10_000)
    import math_verify  # noqa: F401 - import before saying ready, so start-up is not charged to a request

    import trl_flowrl.rewards.math_reward  # noqa: F401

    serve(_answer)


if __name__ == "__main__":
    main()
