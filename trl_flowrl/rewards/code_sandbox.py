"""Run untrusted Python programs: a local sandbox (default, no Docker) behind a small executor interface.

`LocalSandbox.run(code, stdin, files, fetch, timeout_s)` runs `code` as `main.py` in a fresh subprocess, in a fresh
temporary directory that is deleted afterwards, and returns an `ExecutionResult`. Every run gets:

- resource limits (setrlimit): CPU time, address space, file size, open files; a process cap (RLIMIT_NPROC under a
  per-slot uid, and, as root, a pids cgroup per slot);
- a scrubbed environment (no variable of the trainer's process reaches the program) and `python -I`;
- a new session, a hard SIGKILL of the whole process tree at the wall-clock timeout, and capped stdout/stderr;
- at most `max_concurrency` programs at once (the others wait);
- where the OS allows it (detected at run time, strongest first, with a logged warning naming what is missing):
  new mount, pid and network namespaces, every mount read-only except the work directory, a fresh /proc (the
  trainer's processes and their environments are invisible), no network (not even loopback), no capabilities.

Isolation modes (`isolation="auto"` picks the first that works):
- `namespaces` (root): the above, the program running as an unprivileged uid per slot. Needs the interpreter and its
  packages to be readable by that uid (a Python under /root is not; the mode is then skipped).
- `bwrap` (bubblewrap installed): the same namespaces set up by bwrap; the program keeps the caller's uid, with no
  capabilities.
- `userns`: the same namespaces in an unprivileged user namespace; the program keeps the caller's uid (mapped), with
  no capabilities.
- `none`: only rlimits, the session, the scrubbed environment and (as root) the uid drop.

What this sandbox does NOT protect against:
- kernel exploits: the program shares the host kernel (namespaces are not a VM); use the remote executor, a container
  or a VM for code you believe to be actively malicious rather than merely buggy or reward-hacking;
- reading files: the whole file system stays readable (read-only), subject to the program's uid: in `bwrap`,
  `userns` and `none` modes it can read whatever the trainer's user can (e.g. a hub token in the home directory);
- CPU and memory contention with the trainer: memory is limited per process (`memory_mb` each, up to the process
  cap), CPU time per process, and nothing reserves cores for the trainer;
- fork bombs where there is no process cap: in `bwrap`/`userns` modes without root (no pids cgroup) they are bounded
  only by the pid namespace teardown at the timeout; RLIMIT_NPROC is not used there, as it would count the trainer's
  own threads;
- anything in `none` mode beyond the limits: network access, writes wherever the user may write, reading other
  processes' environments, processes that leave the session before the timeout kill;
- programs that attack the test harness from inside: in the function-call and assert styles the program shares its
  interpreter with the harness. Expected outputs of function-call tests never enter the sandbox (results are
  compared in the trainer's process), but an assert-style test (HumanEval+) carries its expected values into the
  sandbox, and a program written to read them or to introspect the harness's frames could forge a pass.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import queue
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


logger = logging.getLogger(__name__)

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py")
ISOLATION_MODES = ("auto", "namespaces", "bwrap", "userns", "none")
_STATUSES = ("ok", "error", "timeout", "output_limit", "sandbox_error")


@dataclass
class ExecutionResult:
    """The outcome of one program run.

    `status`: `"ok"` (exit code 0), `"error"` (non-zero exit, uncaught exception, killed by a limit), `"timeout"`
    (wall clock), `"output_limit"` (stdout/stderr over the cap), or `"sandbox_error"` (the executor itself failed:
    an infrastructure problem, not the program's fault). `files` holds the fetched files that exist (text, capped).
    """

    status: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    @property
    def infra_error(self) -> bool:
        return self.status == "sandbox_error"


class CodeExecutor(Protocol):
    """What the code reward needs from an executor (`LocalSandbox`, `SandboxFusionExecutor`)."""

    def run(
        self,
        code: str,
        stdin: str = "",
        files: dict[str, str] | None = None,
        fetch: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> ExecutionResult: ...


@dataclass
class SandboxLimits:
    """Per-program limits. `timeout_s` is wall clock; CPU time is limited to the same number of seconds."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    open_files: int = 64
    max_output_bytes: int = 16 * 1024 * 1024

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "file_size_mb", "open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}.")


def _clean_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


class LocalSandbox:
    """Runs Python programs in subprocesses on this machine; see the module docstring for what it does and does not do.

    Args:
        limits: a `SandboxLimits`.
        max_concurrency: programs running at once; further calls wait for a free slot.
        isolation: `"auto"` (the strongest mode that works here), `"namespaces"` (root), `"userns"`, or `"none"`.
        uid_base: as root, slot `i` runs as uid/gid `uid_base + i`, which should belong to no real user.
        python: the interpreter that runs the programs (default: this one, so the programs see the same packages).
        work_root: where the temporary work directories are created (default: the system temp dir).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        max_concurrency: int = 2,
        isolation: str = "auto",
        uid_base: int = 2_000_000_000,
        python: str | None = None,
        work_root: str | None = None,
    ):
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}.")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        self.limits = limits or SandboxLimits()
        self.max_concurrency = max_concurrency
        self.requested_isolation = isolation
        self.uid_base = uid_base
        self.python = python or sys.executable
        self.work_root = os.path.realpath(work_root or tempfile.gettempdir())
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(max_concurrency):
            self._slots.put(i)
        self._mode: tuple[str, bool] | None = None
        self._mode_lock = threading.Lock()
        self._cgroups: list[str | None] = [None] * max_concurrency
        self._cgroups_pid = os.getpid()

    # -- isolation detection -------------------------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        """The isolation mode in effect (detected on first use when `"auto"`)."""
        return self._resolve_mode()[0]

    def _resolve_mode(self) -> tuple[str, bool]:
        if self._mode is not None:
            return self._mode
        with self._mode_lock:
            if self._mode is None:
                self._mode = self._detect()
        return self._mode

    def _detect(self) -> tuple[str, bool]:
        root = os.geteuid() == 0
        if root:
            self._cgroups = _make_pids_cgroups(self.max_concurrency, self.limits.max_processes + 2)
            self._cgroups_pid = os.getpid()
        if self.requested_isolation == "none" and root:
            # Rather an unprivileged uid, but `none` as root falls back to running the program as root.
            candidates = [("none", True), ("none", False)]
        elif self.requested_isolation != "auto":
            candidates = [(self.requested_isolation, root and self.requested_isolation == "namespaces")]
        elif root:
            candidates = [("namespaces", True), ("bwrap", False), ("userns", False), ("none", True)]
        else:
            candidates = [("bwrap", False), ("userns", False), ("none", False)]
        if shutil.which("bwrap") is None and self.requested_isolation == "auto":
            candidates = [c for c in candidates if c[0] != "bwrap"]
        failures = []
        for mode, drop in candidates:
            result = self._run_with_mode((mode, drop), 0, "print(6 * 7)", "", {}, (), 30.0)
            if result.status == "ok" and result.stdout.strip() == "42":
                if mode not in ("namespaces", "bwrap"):
                    logger.warning(
                        "Code sandbox runs in %r isolation (%s): %s. See trl_flowrl.rewards.code_sandbox for what "
                        "this does not protect against.",
                        mode,
                        "; ".join(failures) or "as requested",
                        {
                            "userns": "the program keeps the trainer's uid (read-only file system, no capabilities); "
                            + (
                                "process count capped by a pids cgroup"
                                if self._cgroups[0]
                                else "fork bombs bounded only by the pid namespace and the timeout"
                            ),
                            "none": "NO network, file-system or process isolation, only rlimits"
                            + (
                                " and an unprivileged uid"
                                if drop
                                else (", and the program runs AS ROOT" if root else "")
                            ),
                        }[mode],
                    )
                return mode, drop
            reason = result.detail or result.stderr.strip()[-200:]
            if drop and "Permission denied" in reason:
                reason += f"; the interpreter {self.python} and its packages must be readable by an unprivileged uid"
            failures.append(f"{mode} unavailable ({reason})")
        raise RuntimeError(f"No sandbox isolation mode works here: {'; '.join(failures)}")

    # -- running -------------------------------------------------------------------------------------------------

    def run(
        self,
        code: str,
        stdin: str = "",
        files: dict[str, str] | None = None,
        fetch: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> ExecutionResult:
        """Run `code` as `main.py` with `stdin`, next to `files` (name -> text); return it with the `fetch` files."""
        mode = self._resolve_mode()
        slot = self._slots.get()
        try:
            return self._run_with_mode(mode, slot, code, stdin, files or {}, tuple(fetch), timeout_s)
        finally:
            self._slots.put(slot)

    def _run_with_mode(self, mode, slot, code, stdin, files, fetch, timeout_s) -> ExecutionResult:
        isolation, drop_uid = mode
        timeout_s = float(timeout_s or self.limits.timeout_s)
        workdir = tempfile.mkdtemp(prefix="trl-flowrl-sbx-", dir=self.work_root)
        uid = gid = None
        try:
            for name, text in {**files, "main.py": code}.items():
                if os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError(f"Sandbox file names must be plain names, got {name!r}.")
                with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                    f.write(text)
            if drop_uid:
                uid = gid = self.uid_base + slot
                for name in [".", *os.listdir(workdir)]:
                    os.chown(os.path.join(workdir, name), uid, gid)
            os.chmod(workdir, 0o700)
            return self._execute(isolation, uid, gid, slot, workdir, stdin, fetch, timeout_s)
        finally:
            shutil.rmtree(workdir, onerror=_force_remove)

    def _slot_cgroup(self, slot: int) -> str | None:
        if self._cgroups[0] is not None and self._cgroups_pid != os.getpid():
            # A forked child gets cgroups of its own: the parent's are counted, and removed, by the parent.
            with self._mode_lock:
                if self._cgroups_pid != os.getpid():
                    self._cgroups = _make_pids_cgroups(self.max_concurrency, self.limits.max_processes + 2)
                    self._cgroups_pid = os.getpid()
        return self._cgroups[slot]

    def _execute(self, isolation, uid, gid, slot, workdir, stdin, fetch, timeout_s) -> ExecutionResult:
        limits = self.limits
        cpu = max(1, int(timeout_s + 0.999))
        rlimits = {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": limits.file_size_mb * 1024 * 1024,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_CORE": 0,
            # Counted per uid: only meaningful when the program has a uid of its own.
            "RLIMIT_NPROC": limits.max_processes if uid is not None else None,
        }
        env = _clean_env(workdir)
        argv = [self.python, "-I", "-B", "main.py"]
        if isolation == "bwrap":
            argv = _bwrap_command(workdir, env) + argv
        status_r, status_w = os.pipe()
        config = {
            "status_fd": status_w,
            "isolation": "none" if isolation == "bwrap" else isolation,
            "wrapped": isolation == "bwrap",
            "workdir": workdir,
            "uid": uid,
            "gid": gid,
            "rlimits": rlimits,
            "argv": argv,
            "cgroup": self._slot_cgroup(slot),
            "env": env,
        }
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=workdir,
                start_new_session=True,
                pass_fds=(status_w,),
            )
        except OSError as exc:
            os.close(status_r)
            return ExecutionResult("sandbox_error", detail=f"cannot start the sandbox: {exc}")
        finally:
            os.close(status_w)
        run = _Run(proc, status_r, limits.max_output_bytes, self._slot_cgroup(slot), wrapped=isolation == "bwrap")
        try:
            outcome = run.communicate(stdin.encode(), start + timeout_s)
        finally:
            run.close()
        wall = time.monotonic() - start
        stdout = run.out[1].decode("utf-8", errors="replace")
        stderr = run.out[2].decode("utf-8", errors="replace")[-8192:]
        if not run.exec_started:
            detail = run.status_error or f"sandbox set-up failed (exit {proc.returncode})"
            return ExecutionResult("sandbox_error", proc.returncode, stdout, stderr, wall, detail=detail)
        fetched = {name: text for name in fetch if (text := _read_regular_file(workdir, name)) is not None}
        if outcome is None:
            outcome = "ok" if proc.returncode == 0 else "error"
        return ExecutionResult(outcome, proc.returncode, stdout, stderr, wall, fetched)


class _Run:
    """Feeds stdin, collects capped stdout/stderr and the start-up status, and kills the tree at the deadline."""

    def __init__(self, proc, status_fd: int, max_output: int, cgroup: str | None = None, wrapped: bool = False):
        self.proc, self.status_fd, self.max_output, self.cgroup = proc, status_fd, max_output, cgroup
        self.wrapped = wrapped
        self.out = {1: b"", 2: b""}
        self.status_buffer = b""
        self.init_pidfd: int | None = None
        self.exec_started = False
        self.status_error = ""

    def _on_status(self, chunk: bytes) -> None:
        self.status_buffer += chunk
        *lines, self.status_buffer = self.status_buffer.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith("PID ") and self.init_pidfd is None:
                with contextlib.suppress(OSError, ValueError):
                    self.init_pidfd = os.pidfd_open(int(text[4:]))
            elif text == "EXEC":
                self.exec_started = True
            elif text.startswith("ERR "):
                self.status_error = text[4:]

    def kill(self) -> None:
        if self.init_pidfd is not None:
            # Killing a pid namespace's init kills every process in it, whatever session it moved to. Its pidfd
            # becomes readable once it has exited, which happens after every other process of the namespace is gone,
            # so the slot (and its pids cgroup) is free when the next program starts.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                select.select([self.init_pidfd], [], [], 10.0)
        if self.wrapped and self.exec_started and self.proc.poll() is None:
            # The bootstrap kills bwrap on SIGTERM and reaps the sandbox's orphans; SIGKILL it only if it hangs.
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5.0)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_until_empty(self) -> None:
        """Without a pidfd (bwrap), wait for the slot's cgroup to empty (after the bootstrap was reaped)."""
        if self.cgroup is not None:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and _cgroup_tasks(self.cgroup) > 0:
                time.sleep(0.01)

    def communicate(self, stdin: bytes, deadline: float) -> str | None:
        """Returns `"timeout"` or `"output_limit"` if the run was killed for it, else None once it has exited."""
        sel = selectors.DefaultSelector()
        proc = self.proc
        sel.register(proc.stdout, selectors.EVENT_READ, 1)
        sel.register(proc.stderr, selectors.EVENT_READ, 2)
        sel.register(self.status_fd, selectors.EVENT_READ, 0)
        os.set_blocking(proc.stdin.fileno(), False)
        pending = memoryview(stdin)
        if pending:
            sel.register(proc.stdin, selectors.EVENT_WRITE, 3)
        else:
            proc.stdin.close()
        verdict = None
        try:
            while len(sel.get_map()) > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    verdict = "timeout"
                    break
                for key, _ in sel.select(min(remaining, 1.0)):
                    if key.data == 3:
                        try:
                            written = os.write(key.fd, pending[: 1 << 16])
                        except (BrokenPipeError, OSError):
                            written = len(pending)
                        pending = pending[written:]
                        if not pending:
                            sel.unregister(key.fileobj)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == 0:
                        self._on_status(chunk)
                    else:
                        self.out[key.data] += chunk
                        if len(self.out[key.data]) > self.max_output:
                            verdict = "output_limit"
                            break
                if verdict:
                    break
        finally:
            sel.close()
        if verdict:
            self.kill()
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) + (5.0 if verdict else 1.0))
        except subprocess.TimeoutExpired:
            verdict = verdict or "timeout"
            self.kill()
            proc.wait()
        # Pipes closed but a background child of the program still alive: the tree goes at the end of the run.
        self.kill()
        self.wait_until_empty()
        return verdict

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):
            os.close(self.status_fd)
        if self.init_pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.init_pidfd)


_CGROUP_V1_PIDS = "/sys/fs/cgroup/pids"
_cgroup_ids = itertools.count()


def _cgroup_tasks(path: str) -> int:
    try:
        with open(os.path.join(path, "pids.current")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _bwrap_command(workdir: str, env: dict[str, str]) -> list[str]:
    """bubblewrap: new user/pid/net/ipc/uts namespaces, / read-only, the work dir writable, no capabilities."""
    command = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-all"]
    command += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", workdir, workdir]
    command += ["--chdir", workdir, "--clearenv"]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return command + ["--"]


def _make_pids_cgroups(count: int, max_tasks: int) -> list[str | None]:
    """One cgroup-v1 pids cgroup per slot capping its task count (as root); `[None] * count` where unavailable.

    RLIMIT_NPROC does not apply to root's uid, so this is what stops a fork bomb of a program that keeps uid 0 (the
    `userns` mode as root). Removed at interpreter exit.
    """
    paths: list[str | None] = []
    try:
        for slot in range(count):
            path = os.path.join(_CGROUP_V1_PIDS, f"trl-flowrl-sandbox-{os.getpid()}-{next(_cgroup_ids)}-{slot}")
            os.mkdir(path)
            paths.append(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_tasks))
    except OSError:
        _remove_cgroups(paths)
        return [None] * count
    atexit.register(_remove_cgroups, list(paths), os.getpid())
    return paths


def _remove_cgroups(paths, owner: int | None = None) -> None:
    if owner is not None and owner != os.getpid():  # a forked child must not remove its parent's cgroups
        return
    for path in paths:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _read_regular_file(workdir: str, name: str, cap: int = 8 * 1024 * 1024) -> str | None:
    """Read a file the program wrote, refusing symlinks, FIFOs and devices (the program controls what is there)."""
    try:
        fd = os.open(os.path.join(workdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, cap)
        return data.decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _force_remove(function, path, _exc) -> None:
    # A program may have removed the write permission of directories it created.
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)
