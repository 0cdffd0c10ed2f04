"""A remote code executor speaking the SandboxFusion `run_code` HTTP protocol, behind the `LocalSandbox` interface.

SandboxFusion (bytedance/SandboxFusion) runs code in its own containers: `POST {url}/run_code` with a JSON body
`{"code", "language", "stdin", "run_timeout", "compile_timeout", "files": {path: base64}, "fetch_files": [path]}`
answers `{"status": "Success" | "Failed" | "SandboxError", "message", "compile_result", "run_result": {"status":
"Finished" | "Error" | "TimeLimitExceeded", "return_code", "stdout", "stderr", "execution_time"}, "files": {path:
base64}}`. Use it when programs must not run on the training machine at all.

Infrastructure failures (connection refused or reset, HTTP 5xx or 429, a response that is not the protocol's JSON,
`SandboxError`, a reply whose fields do not have the protocol's types, a request that outlasts its time budget) are
retried with exponential backoff and, when the retries are spent, returned as
`status="sandbox_error"`: the code reward then scores them `infra_error_score` (default `None`) and counts them,
instead of scoring a wrong answer. Other HTTP 4xx answers (a malformed request) are not retried. At most
`max_concurrency` requests are in flight at once. Each attempt is bounded in all, connecting, sending, waiting and
reading together, by the run timeout plus `request_margin_s` (a server that trickles its reply cannot hold a request
longer). Only the standard library is used (`http.client`); proxy environment variables are not used.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import select
import socket
import ssl
import threading
import time
import urllib.parse
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
        request_margin_s: each HTTP attempt may take this much longer than the run timeout, in all, before it is
            abandoned (and retried).
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

    def _post(self, body: bytes, budget: float) -> dict:
        """One POST, bounded by `budget` seconds in all (connecting, sending, waiting, reading), not per read: the
        exchange runs on a non-blocking socket against one deadline, and the complete response is then parsed."""
        deadline = time.monotonic() + budget
        parts = urllib.parse.urlsplit(self.url)
        https = parts.scheme == "https"
        request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        sock = None
        try:
            sock = socket.create_connection((parts.hostname, parts.port or (443 if https else 80)), timeout=budget)
            sock.setblocking(False)
            if https:
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=parts.hostname, do_handshake_on_connect=False)
                _io(sock, deadline, sock.do_handshake)
            view = memoryview(request)
            while view:
                view = view[_io(sock, deadline, sock.send, view) :]
            raw = b""
            while not _complete(raw):
                chunk = _io(sock, deadline, sock.recv, 1 << 16)
                if not chunk:
                    break
                raw += chunk
                if len(raw) > _MAX_REPLY_BYTES:
                    raise _Retryable(f"response over {_MAX_REPLY_BYTES} bytes")
        except TimeoutError:
            raise _Retryable(f"request timed out after {budget:.1f} s") from None
        except OSError as exc:  # refused, reset, unreachable, TLS errors
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        finally:
            if sock is not None:
                sock.close()
        try:
            response = http.client.HTTPResponse(_Received(raw))
            response.begin()
            data = response.read()
        except (http.client.HTTPException, ValueError) as exc:
            raise _Retryable(f"response is not HTTP ({type(exc).__name__}): {raw[:200]!r}") from None
        if response.status >= 500 or response.status == 429:
            raise _Retryable(f"HTTP {response.status}")
        if response.status != 200:
            raise _Fatal(f"HTTP {response.status}: {data[:300]!r}")
        try:
            reply = json.loads(data)
        except ValueError:
            raise _Retryable(f"response is not JSON: {data[:200]!r}") from None
        problem = _shape_problem(reply)
        if problem:
            raise _Retryable(f"response is not a run_code reply ({problem}): {data[:200]!r}")
        return reply

    @staticmethod
    def _to_result(reply: dict, wall: float) -> ExecutionResult | None:
        """The run's result, or None for a `SandboxError` (to be retried). `reply` passed `_shape_problem`."""
        if reply["status"] == "SandboxError":
            return None
        files = {}
        for name, data in (reply.get("files") or {}).items():
            try:
                files[name] = base64.b64decode(data).decode("utf-8", errors="replace")
            except ValueError:
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


_MAX_REPLY_BYTES = 64 * 1024 * 1024


def _io(sock, deadline: float, operation, *args):
    """`operation(*args)` on a non-blocking socket, waiting for it to be ready until `deadline` (TimeoutError)."""
    while True:
        try:
            return operation(*args)
        except (BlockingIOError, ssl.SSLWantReadError):
            ready = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]
        except ssl.SSLWantWriteError:
            ready = select.select([], [sock], [], max(0.0, deadline - time.monotonic()))[1]
        if not ready:
            raise TimeoutError


def _complete(raw: bytes) -> bool:
    """Whether `raw` holds a whole HTTP response (by Content-Length or the last chunk); otherwise read to EOF."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return False
    headers = {}
    for line in raw[:end].decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "chunked" in headers.get("transfer-encoding", ""):
        return raw.endswith(b"\r\n0\r\n\r\n")
    length = headers.get("content-length", "")
    return length.isdigit() and len(raw) - end - 4 >= int(length)


class _Received:
    """What `http.client.HTTPResponse` reads a response from: the bytes already received."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def makefile(self, *args, **kwargs):
        return io.BytesIO(self.raw)


_OPTIONAL = (str, type(None))
_RESULT_FIELDS = {"status": _OPTIONAL, "stdout": _OPTIONAL, "stderr": _OPTIONAL, "return_code": (int, type(None))}


def _shape_problem(reply) -> str:
    """What is wrong with the shape of a `run_code` reply ("" if nothing): the fields this client reads must have
    the protocol's types, or the reply is an infrastructure error rather than an exception here."""
    if not isinstance(reply, dict):
        return f"a {type(reply).__name__}, not an object"
    if not isinstance(reply.get("status"), str):
        return "no string 'status'"
    for key in ("run_result", "compile_result"):
        part = reply.get(key)
        if part is None:
            continue
        if not isinstance(part, dict):
            return f"'{key}' is a {type(part).__name__}"
        for name, types in _RESULT_FIELDS.items():
            value = part.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                return f"'{key}.{name}' is a {type(value).__name__}"
    files = reply.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        return "'files' is not an object of base64 strings"
    return ""


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass
