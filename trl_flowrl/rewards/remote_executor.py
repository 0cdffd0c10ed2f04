"""A remote code executor speaking the SandboxFusion `run_code` HTTP protocol, behind the `LocalSandbox` interface.

SandboxFusion (bytedance/SandboxFusion) runs code in its own containers: `POST {url}/run_code` with a JSON body
`{"code", "language", "stdin", "run_timeout", "compile_timeout", "files": {path: base64}, "fetch_files": [path]}`
answers `{"status": "Success" | "Failed" | "SandboxError", "message", "compile_result", "run_result": {"status":
"Finished" | "Error" | "TimeLimitExceeded", "return_code", "stdout", "stderr", "execution_time"}, "files": {path:
base64}}`. Use it when programs must not run on the training machine at all.

Infrastructure failures (connection refused or reset, HTTP 5xx or 429, a response that is not the protocol's JSON,
`SandboxError`, a request timeout) are retried with exponential backoff and, when the retries are spent, returned as
`status="sandbox_error"`: the code reward then scores them `infra_error_score` (default `None`) and counts them,
instead of scoring a wrong answer. Other HTTP 4xx answers (a malformed request) are not retried. At most
`max_concurrency` requests are in flight at once. Only the standard library is used (`urllib`).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

from .code_sandbox import ExecutionResult


logger = logging.getLogger(__name__)


class SandboxFusionExecutor:
    """Runs programs on a SandboxFusion server.

    Args:
        url: the server, e.g. `"http://localhost:8080"` (`/run_code` is appended unless already there).
        max_concurrency: requests in flight at once (also how many programs the code reward runs in parallel).
        max_retries: retries after an infrastructure failure (so up to `max_retries + 1` attempts).
        backoff_s: first retry delay, doubled on each further retry.
        default_timeout_s: run timeout when `run` is given none.
        request_margin_s: the HTTP request may take this much longer than the run timeout before it is abandoned.
        language: SandboxFusion language (`"python"`).
    """

    def __init__(
        self,
        url: str = "http://localhost:8080",
        max_concurrency: int = 8,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        default_timeout_s: float = 10.0,
        request_margin_s: float = 10.0,
        language: str = "python",
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0 or backoff_s < 0 or default_timeout_s <= 0 or request_margin_s < 0:
            raise ValueError("max_retries, backoff_s, request_margin_s must be >= 0 and default_timeout_s > 0.")
        url = url.rstrip("/")
        self.url = url if url.endswith("/run_code") else url + "/run_code"
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.default_timeout_s = default_timeout_s
        self.request_margin_s = request_margin_s
        self.language = language
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._stats_lock = threading.Lock()
        self.stats: Counter[str] = Counter()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def run(
        self,
        code: str,
        stdin: str = "",
        files: dict[str, str] | None = None,
        fetch: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> ExecutionResult:
        timeout_s = float(timeout_s or self.default_timeout_s)
        body = json.dumps(
            {
                "code": code,
                "language": self.language,
                "stdin": stdin,
                "run_timeout": timeout_s,
                "compile_timeout": timeout_s,
                "files": {name: base64.b64encode(text.encode()).decode() for name, text in (files or {}).items()},
                "fetch_files": list(fetch),
            }
        ).encode()
        last_error = ""
        start = time.monotonic()
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self._count("requests")
            with self._slots:
                try:
                    reply = self._post(body, timeout_s + self.request_margin_s)
                except _Retryable as exc:
                    last_error = str(exc)
                    continue
                except _Fatal as exc:
                    last_error = str(exc)
                    break
            result = self._to_result(reply, time.monotonic() - start)
            if result is not None:
                return result
            last_error = f"SandboxError: {reply.get('message', '')}"[:500]
        self._count("infra_errors")
        logger.warning("SandboxFusion request failed after %d attempt(s): %s", attempt + 1, last_error)
        return ExecutionResult("sandbox_error", wall_s=time.monotonic() - start, detail=last_error)

    def _post(self, body: bytes, timeout: float) -> dict:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(f"HTTP {exc.code}") from None
            raise _Fatal(f"HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise _Retryable(f"response is not JSON: {raw[:200]!r}") from None
        if not isinstance(reply, dict) or "status" not in reply:
            raise _Retryable(f"response is not a run_code reply: {raw[:200]!r}")
        return reply

    @staticmethod
    def _to_result(reply: dict, wall: float) -> ExecutionResult | None:
        """The run's result, or None for a `SandboxError` (to be retried)."""
        if reply["status"] == "SandboxError":
            return None
        files = {}
        for name, data in (reply.get("files") or {}).items():
            try:
                files[name] = base64.b64decode(data).decode("utf-8", errors="replace")
            except (ValueError, TypeError):
                continue
        run = reply.get("run_result")
        if not run:
            compiled = reply.get("compile_result") or {}
            if compiled.get("status") in ("Error", "TimeLimitExceeded") or compiled.get("return_code"):
                return ExecutionResult("error", compiled.get("return_code"), "", compiled.get("stderr") or "", wall)
            return None
        status = {"Finished": None, "TimeLimitExceeded": "timeout", "Error": "error"}.get(run.get("status"), "error")
        code = run.get("return_code")
        if status is None:
            status = "ok" if code == 0 else "error"
        return ExecutionResult(status, code, run.get("stdout") or "", run.get("stderr") or "", wall, files)


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass
