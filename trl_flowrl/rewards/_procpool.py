"""A small pool of long-lived worker subprocesses with a hard deadline per request.

Why not `multiprocessing` or `concurrent.futures`: a hung call in a process pool cannot be cancelled without breaking
the whole pool, `multiprocessing`'s spawn/forkserver children re-import the user's `__main__` (a training script
without a `__main__` guard would start training again), and a thread cannot be stopped at all. Here each worker is a
plain `subprocess.Popen` of a Python module that reads one JSON request per line on stdin and writes one JSON reply per
line on stdout (`serve` is that loop, for the worker's side). JSON keeps the channel free of pickle.

The deadline covers the whole request: writing it (non-blocking, so a stopped worker whose pipe is full cannot hold
the caller) and reading the reply. A worker that misses it is SIGKILLed; the slot starts a fresh worker on its next
use. Workers die with the process that started them, even while busy on a request: `serve` sets
`PR_SET_PDEATHSIG` (Linux) and watches stdin on a thread of its own, which ends the process when the pool's end of the
pipe closes or the parent changes. `PR_SET_PDEATHSIG` follows the *thread* that started the worker, so workers are
started on one thread the pool keeps for that.

The pool is created lazily, reused across calls, re-created in a child after `fork` (the parent's workers are left to
the parent) and shut down at interpreter exit.

Not handled: on other systems than Linux only the stdin watchdog ends a worker whose parent died, and it cannot run
while the worker's main thread holds the GIL in a long C call; a `fork` of the parent that keeps running also keeps
the workers' stdin open (the parent-pid check then ends them within a second).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


logger = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PARENT_ENV = "TRL_FLOWRL_POOL_PARENT"  # the pid a worker must die with
_PR_SET_PDEATHSIG = 1


class WorkerTimeout(Exception):
    """The worker did not answer before the deadline and was killed."""


class WorkerCrashed(Exception):
    """The worker died or answered garbage (its stderr tail, if any, is in the message).

    `during_request`: it had been sent the request and died, or wrote garbage, before answering it (what the request
    itself may have caused), rather than failing to start or to take the request.
    """

    def __init__(self, message: str = "", during_request: bool = False):
        super().__init__(message)
        self.during_request = during_request


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
        self._spawner: ThreadPoolExecutor | None = None
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
            self._executor = self._spawner = None
            self._pid = os.getpid()

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env.update(self._extra_env)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env[_PARENT_ENV] = str(os.getpid())
        with self._lock:
            if self._spawner is None:
                self._spawner = ThreadPoolExecutor(1, thread_name_prefix="trl-flowrl-spawn")
        # Started on the pool's own long-lived thread: a worker's PR_SET_PDEATHSIG fires when the thread that
        # started it ends, and the caller's thread may be short-lived.
        slot.proc = self._spawner.submit(
            subprocess.Popen,
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        ).result()
        os.set_blocking(slot.proc.stdin.fileno(), False)  # written with a deadline, see `_send`
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
        for executor in (self._executor, self._spawner):
            if executor is not None:
                executor.shutdown(wait=False)
        self._executor = self._spawner = None

    # -- requests --------------------------------------------------------------------------------------------------

    def request(self, payload: dict, deadline_s: float) -> dict:
        """Send one request and read its reply within `deadline_s` seconds (sending included, the worker's start-up not).

        Raises:
            WorkerTimeout: no reply in time; the worker was killed and will be replaced.
            WorkerCrashed: the worker exited or wrote something that is not a JSON line (`during_request` if that
                happened once it had been sent the request).
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
            # Start-up is not charged to the request; sending it is.
            deadline = time.monotonic() + deadline_s
            try:
                self._send(slot, line, deadline)
                break
            except OSError:
                # A worker that died between requests: start a new one and send again, once.
                self._kill(slot)
                if attempt == 1:
                    raise WorkerCrashed("worker pipe closed twice in a row") from None
        reply = self._read_line(slot, deadline)
        try:
            return json.loads(reply)
        except ValueError:
            self._kill(slot)
            raise WorkerCrashed(f"unreadable reply: {reply[:200]!r}", during_request=True) from None

    def _timed_out(self, slot: _Slot) -> WorkerTimeout:
        self._kill(slot)
        self.restarts += 1
        return WorkerTimeout("worker killed at its deadline")

    def _send(self, slot: _Slot, data: bytes, deadline: float) -> None:
        """Write `data` to the worker's (non-blocking) stdin by `deadline`: a worker that stops reading cannot block."""
        fd, view = slot.proc.stdin.fileno(), memoryview(data)
        while view:
            if not _wait(fd, select.POLLOUT, deadline):
                raise self._timed_out(slot)
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue

    def _read_line(self, slot: _Slot, deadline: float) -> bytes:
        fd = slot.proc.stdout.fileno()
        while b"\n" not in slot.buffer:
            if not _wait(fd, select.POLLIN, deadline):
                raise self._timed_out(slot)
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = slot.proc.poll()
                self._kill(slot)
                self.restarts += 1
                # On the ready line, `_request_on` re-raises it as a start-up failure.
                raise WorkerCrashed(f"worker exited (code {code})", during_request=True)
            slot.buffer += chunk
        line, _, slot.buffer = slot.buffer.partition(b"\n")
        return line


def _wait(fd: int, event: int, deadline: float) -> bool:
    """Whether `fd` is ready for `event` (or hung up / in error) before `deadline`. `poll`, not `select`: a trainer's
    descriptors can be numbered above select's 1024."""
    poller = select.poll()
    poller.register(fd, event)
    while (remaining := deadline - time.monotonic()) > 0:
        if poller.poll(max(1, int(remaining * 1000))):
            return True
    return False


_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_live_pools):
        pool.close()


# -- the worker's side ----------------------------------------------------------------------------------------------


def serve(handle: Callable[[dict], dict], die_with_parent: bool = True) -> None:
    """Run a worker: say ready, then answer each JSON request line on stdin with `handle(request)` as a JSON line.

    `handle` runs on the main thread (where `signal.alarm` works) and must return a JSON-serialisable dict. Requests
    are read by a daemon thread, which ends the process at once when stdin closes (the pool closed the worker, or its
    process died) or the parent process changes, even while `handle` is busy. `die_with_parent` also asks the kernel
    (Linux `PR_SET_PDEATHSIG`) to SIGKILL this process when its parent goes, which holds when the main thread is stuck
    in C code holding the GIL.
    """
    parent = int(os.environ.get(_PARENT_ENV) or os.getppid())
    if die_with_parent and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)
    requests: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=_read_requests, args=(requests, parent), daemon=True, name="trl-flowrl-stdin").start()
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    while True:
        out.write(json.dumps(handle(json.loads(requests.get()))).encode() + b"\n")
        out.flush()


def _read_requests(requests: queue.Queue, parent: int) -> None:
    fd, pending = sys.stdin.fileno(), []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        if not poller.poll(1000):
            if os.getppid() != parent:  # reparented: the pool's process is gone, though a fork holds our stdin
                os._exit(0)
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            os._exit(0)
        *lines, rest = chunk.split(b"\n")
        if lines:
            requests.put(b"".join(pending) + lines[0])
            for line in lines[1:]:
                requests.put(line)
            pending = []
        pending.append(rest)
