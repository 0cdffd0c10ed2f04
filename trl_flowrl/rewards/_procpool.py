"""A small pool of long-lived worker subprocesses with a hard deadline per request.

Why not `multiprocessing` or `concurrent.futures`: a hung call in a process pool cannot be cancelled without breaking
the whole pool, `multiprocessing`'s spawn/forkserver children re-import the user's `__main__` (a training script
without a `__main__` guard would start training again), and a thread cannot be stopped at all. Here each worker is a
plain `subprocess.Popen` of a Python module that reads one JSON request per line on stdin and writes one JSON reply per
line on stdout. A request that has not answered by its deadline gets its worker SIGKILLed; the slot starts a fresh
worker on its next use. `Popen` is safe to call from any thread (it execs at once, no `preexec_fn`), and JSON keeps the
channel free of pickle.

The pool is created lazily, reused across calls, re-created in a child after `fork` (the parent's workers are left to
the parent) and shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


logger = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerTimeout(Exception):
    """The worker did not answer before the deadline and was killed."""


class WorkerCrashed(Exception):
    """The worker died or answered garbage (its stderr tail, if any, is in the message)."""


@dataclass
class _Slot:
    proc: subprocess.Popen | None = None
    buffer: bytes = b""


class WorkerPool:
    """`num_workers` subprocesses running `python -m <module>`, each answering JSON-line requests.

    Args:
        module: importable module run as the worker (`python -m module`); it must write one line when ready, then
            answer every request line with exactly one reply line.
        num_workers: number of worker processes (and of requests served at once).
        env: extra environment variables for the workers.
    """

    def __init__(
        self, module: str, num_workers: int = 2, env: dict[str, str] | None = None, startup_timeout: float = 120.0
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.module = module
        self.startup_timeout = startup_timeout
        self.num_workers = num_workers
        self._extra_env = dict(env or {})
        self._lock = threading.Lock()
        self._pid = None
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._executor: ThreadPoolExecutor | None = None
        self.restarts = 0
        _live_pools.add(self)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def _ensure_initialised(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # After a fork the inherited slots belong to the parent: forget them without killing anything.
            self._slots = [_Slot() for _ in range(self.num_workers)]
            self._idle = queue.Queue()
            for slot in self._slots:
                self._idle.put(slot)
            self._executor = None
            self._pid = os.getpid()

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env.update(self._extra_env)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        slot.buffer = b""
        # The worker writes one line once its imports are done, so start-up time never eats a request's deadline.
        try:
            self._read_line(slot, time.monotonic() + self.startup_timeout)
        except WorkerTimeout:
            raise WorkerCrashed(f"worker did not start within {self.startup_timeout:g} s") from None

    @staticmethod
    def _kill(slot: _Slot) -> None:
        proc, slot.proc = slot.proc, None
        slot.buffer = b""
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("Worker %s did not exit after SIGKILL.", proc.pid)

    def close(self) -> None:
        """Kill every worker of this process's pool. The pool starts new workers if used again."""
        if self._pid != os.getpid():
            return
        for slot in self._slots:
            self._kill(slot)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- requests --------------------------------------------------------------------------------------------------

    def request(self, payload: dict, deadline_s: float) -> dict:
        """Send one request and wait at most `deadline_s` seconds for its reply.

        Raises:
            WorkerTimeout: no reply in time; the worker was killed and will be replaced.
            WorkerCrashed: the worker exited or wrote something that is not a JSON line.
        """
        self._ensure_initialised()
        slot = self._idle.get()
        try:
            return self._request_on(slot, payload, deadline_s)
        finally:
            self._idle.put(slot)

    def map(self, payloads: list[dict], deadline_s: float) -> list[dict | Exception]:
        """Run `payloads` on all workers at once; each item is a reply dict or the exception it raised."""
        self._ensure_initialised()
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="trl-flowrl-pool")

        def one(payload):
            try:
                return self.request(payload, deadline_s)
            except (WorkerTimeout, WorkerCrashed) as exc:
                return exc

        return list(self._executor.map(one, payloads))

    def _request_on(self, slot: _Slot, payload: dict, deadline_s: float) -> dict:
        line = (json.dumps(payload) + "\n").encode()
        for attempt in (0, 1):
            if slot.proc is None or slot.proc.poll() is not None:
                if slot.proc is not None:
                    self._kill(slot)
                    self.restarts += 1
                try:
                    self._start(slot)
                except (OSError, WorkerCrashed) as exc:
                    self._kill(slot)
                    raise WorkerCrashed(str(exc)) from None
            try:
                slot.proc.stdin.write(line)
                slot.proc.stdin.flush()
                break
            except (BrokenPipeError, OSError):
                # A worker that died between requests: start a new one and send again, once.
                self._kill(slot)
                if attempt == 1:
                    raise WorkerCrashed("worker pipe closed twice in a row") from None
        deadline = time.monotonic() + deadline_s
        reply = self._read_line(slot, deadline)
        try:
            return json.loads(reply)
        except ValueError:
            self._kill(slot)
            raise WorkerCrashed(f"unreadable reply: {reply[:200]!r}") from None

    def _read_line(self, slot: _Slot, deadline: float) -> bytes:
        fd = slot.proc.stdout.fileno()
        while b"\n" not in slot.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill(slot)
                self.restarts += 1
                raise WorkerTimeout("worker killed at its deadline")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = slot.proc.poll()
                self._kill(slot)
                self.restarts += 1
                raise WorkerCrashed(f"worker exited (code {code})")
            slot.buffer += chunk
        line, _, slot.buffer = slot.buffer.partition(b"\n")
        return line


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_live_pools):
        pool.close()
