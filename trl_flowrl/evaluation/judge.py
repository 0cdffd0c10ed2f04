"""The FlowRL paper's diversity rubric, scored by a judge model behind any OpenAI-compatible endpoint.

For each problem the judge reads the problem and the first 300 characters of each of its samples, and answers with a
score from 1 (every sample takes the same approach) to 5 (four or more distinct strategies). The paper reports the
mean over AIME problems of 16 samples: FlowRL 2.28, PPO 1.31, GRPO 1.23, REINFORCE++ 1.11. The rubric wording here is
this project's own statement of that scale, not the paper's prompt, so scores are comparable between models judged
here, and only roughly with the paper's.

HTTP goes through the standard library (`urllib`): `POST {base_url}/chat/completions` with a JSON body, and the API
key, when the named environment variable is set, as a bearer token. Requests that fail with a connection error, a
timeout, 429 or a 5xx status are retried with exponential backoff; other 4xx statuses are not (they mean a wrong
URL, model or key). A problem whose request fails or whose reply holds no score gets `score=None` and the reason in
`error`; the evaluation goes on.

Not handled: streaming, function calling, batch APIs, and rate limits beyond retrying 429s (lower `max_concurrency`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


logger = logging.getLogger(__name__)

RUBRIC = """\
You judge how diverse a set of solution attempts to one problem is. You will see the problem and the beginning \
(at most {max_chars} characters) of each of {num_samples} attempts. Judge only the overall approach or strategy each \
attempt takes (for example: algebraic manipulation, casework, a geometric construction, working backwards, \
brute-force enumeration, a known formula), not wording, notation or correctness.

Score on this scale:
1 - every attempt takes essentially the same approach
2 - one approach dominates; at most one attempt differs in a minor way
3 - two clearly distinct approaches
4 - three clearly distinct approaches
5 - four or more clearly distinct approaches

Reply with one short sentence of reasoning, then a final line of the form "Score: N" with N from 1 to 5."""

_SCORE_LINE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])\b", re.IGNORECASE)
_RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class JudgeConfig:
    """Where and how to ask the judge.

    Args:
        base_url: the API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1` (a vLLM or
            `trl vllm-serve`-style OpenAI server); `/chat/completions` is appended.
        model: the judge model's name as the endpoint knows it.
        api_key_env: name of the environment variable that holds the API key. When it is unset or empty, no
            Authorization header is sent (local servers usually need none).
        max_chars: characters of each sample shown to the judge (the paper: 300).
        temperature: sampling temperature of the judge (0 for repeatable scores).
        max_tokens: cap on the judge's reply.
        timeout: seconds per HTTP request.
        max_retries: retries after the first attempt, for connection errors, timeouts, 429 and 5xx.
        backoff: seconds before the first retry, doubled at each further one.
        max_concurrency: requests in flight at once.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_chars: int = 300
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    max_concurrency: int = 4

    def __post_init__(self):
        if not self.base_url or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"The judge's base_url must start with http:// or https://, got {self.base_url!r}.")
        if not self.model:
            raise ValueError("The judge needs a model name (the `model` field of chat-completions requests).")
        if self.max_chars < 1 or self.max_tokens < 1 or self.max_concurrency < 1:
            raise ValueError("max_chars, max_tokens and max_concurrency must be >= 1.")
        if self.timeout <= 0 or self.max_retries < 0 or self.backoff < 0:
            raise ValueError("timeout must be > 0, max_retries and backoff >= 0.")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass
class JudgeResult:
    """The judge's verdict on one problem: the score (None on failure), its raw reply, and the failure reason."""

    score: int | None
    reply: str | None = None
    error: str | None = None


def build_judge_messages(problem: str, samples: Sequence[str], max_chars: int = 300) -> list[dict[str, str]]:
    """The chat messages asking for the diversity score of `samples` (each cut to its first `max_chars` characters)."""
    if not samples:
        raise ValueError("The judge needs at least one sample.")
    attempts = "\n\n".join(f"### Attempt {i}\n{text[:max_chars]}" for i, text in enumerate(samples, start=1))
    return [
        {"role": "system", "content": RUBRIC.format(max_chars=max_chars, num_samples=len(samples))},
        {"role": "user", "content": f"## Problem\n{problem}\n\n## Attempts\n{attempts}"},
    ]


def parse_judge_score(reply: str) -> int | None:
    """The score of a judge reply: the last `Score: N` (N in 1..5); else the reply's only digit 1-5; else None."""
    matches = _SCORE_LINE.findall(reply)
    if matches:
        return int(matches[-1])
    digits = re.findall(r"(?<!\d)[1-5](?!\d)", reply)
    return int(digits[0]) if len(set(digits)) == 1 else None


class JudgeClient:
    """Sends rubric requests to an OpenAI-compatible chat-completions endpoint (see `JudgeConfig`)."""

    def __init__(self, config: JudgeConfig):
        self.config = config

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The content of the first choice of one chat completion; raises `RuntimeError` once retries are spent."""
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": messages,
                "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens,
            }
        ).encode()
        delay, last_error = self.config.backoff, "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            request = urllib.request.Request(self.config.url, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:200]
                last_error = f"HTTP {error.code} from {self.config.url}: {detail}"
                if error.code not in _RETRY_STATUSES:
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = f"cannot reach {self.config.url}: {getattr(error, 'reason', error)}"
                continue
            except json.JSONDecodeError as error:
                last_error = f"reply from {self.config.url} is not JSON: {error}"
                continue
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise RuntimeError(f"Unexpected chat-completions reply: {str(payload)[:200]}") from None
            return content if isinstance(content, str) else ""
        raise RuntimeError(last_error)

    def judge(self, problem: str, samples: Sequence[str]) -> JudgeResult:
        """The diversity score of one problem's samples."""
        try:
            reply = self.complete(build_judge_messages(problem, samples, self.config.max_chars))
        except RuntimeError as error:
            return JudgeResult(score=None, error=str(error))
        score = parse_judge_score(reply)
        return JudgeResult(score=score, reply=reply, error=None if score is not None else "no score in the reply")

    def judge_many(self, problems: Sequence[str], samples: Sequence[Sequence[str]]) -> list[JudgeResult]:
        """`judge` for each (problem, samples) pair, `max_concurrency` requests at a time; results in order."""
        if len(problems) != len(samples):
            raise ValueError(f"Got {len(problems)} problems but {len(samples)} sample lists.")
        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="trl-flowrl-judge") as pool:
            results = list(pool.map(self.judge, problems, samples))
        failures = [r.error for r in results if r.score is None]
        if failures:
            logger.warning(
                "The judge gave no score for %d of %d problems; first reason: %s",
                len(failures),
                len(results),
                failures[0],
            )
        return results
