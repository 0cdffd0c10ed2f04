"""Run untrusted Python programs: a local sandbox (default, no Docker) behind a small executor interface.

`LocalSandbox.run(code, stdin, files, fetch, timeout_s)` runs `code` as `main.py` in a fresh subprocess, in a fresh
temporary directory that is deleted afterwards, and returns an `ExecutionResult`. Every run gets:

- resource limits (setrlimit): CPU time, address space, file size, open files; a process cap (RLIMIT_NPROC under a
  per-slot uid, and, as root, a pids cgroup per slot);
- a scrubbed environment (no variable of the trainer's process reaches the program) and `python -I`;
- a new session, a hard SIGKILL of the whole process tree at the time limit, and capped stdout/stderr;
- at most `max_concurrency` programs at once (the others wait);
- where the OS allows it (detected at run time, strongest first, with a logged warning naming what is missing):
  new mount, pid, network and IPC namespaces; every mount read-only, nodev and nosuid except the work directory; a
  minimal /dev (null, zero, full, random, urandom, the std* links and a private, size-capped /dev/shm); a fresh /proc
  (the trainer's processes and their environments are invisible); no network (not even loopback); no capabilities;
  a seccomp filter allowing only IP sockets (so no Unix socket of the host, no vsock, no netlink) and no io_uring.

Time limit. `timeout_s` is the program's CPU-time budget and its wall-clock limit. A program still running at the wall
limit is judged from the CPU time its processes had and the time they waited for a CPU (runnable, not running),
exited processes included: from the slot's accounting cgroup where one can be made (cgroup v2 with PSI, write access:
`cpu.stat` and `cpu.pressure`, exact), else from /proc (the live processes' and threads' /proc/<pid>/schedstat, and
the CPU time of the reaped ones, whose wait the kernel no longer keeps and which is estimated at the live processes'
wait per second of CPU, that CPU counted as at least 50 ms):
- it used its CPU budget, or it slept or was blocked for at least half of the wall time (`time.sleep` forever, a
  deadlock): `timeout`, the program's fault;
- otherwise it wanted the CPU and the machine did not give it (the trainer, other programs, other jobs): it keeps
  running, up to `contention_grace` times `timeout_s` of wall time, until it finishes (and is scored), uses its CPU
  budget or goes idle (`timeout`); if the grace runs out first, the run is an infrastructure failure (`sandbox_error`,
  "CPU contention"), not a wrong answer. An infinite loop that gets less than 1/`contention_grace` of a CPU is
  reported that way too: at that level of contention the two cannot be told apart. Without the cgroup, schedstat (a
  kernel without CONFIG_SCHED_INFO) or /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN) the wall limit is final.
A program found to have exited when the limit is checked (the trainer itself was late) is scored on its output.

Nothing outlives the trainer: the bootstrap and the program die with it (parent-death signals, and the pid
namespace dies with its init), and a watchdog process started with the first run removes the work directories and
the pids cgroups (killing anything left in them) as soon as the trainer has exited, SIGKILL included. Work
directories and cgroups left by a trainer that is gone (its lock released) are also removed at the next start.
(One exception: in `none` mode a process the program moved out of its session survives, unless one of the slot's
cgroups still holds it, which a program keeping the trainer's uid can undo; see below.)

Isolation modes (`isolation="auto"` picks the first that works):
- `namespaces` (root): the above, the program running as an unprivileged uid per slot. Needs the interpreter and its
  packages to be readable by that uid (a Python under /root is not; the mode is then skipped).
- `bwrap` (bubblewrap installed): new user/pid/net/ipc/uts namespaces and a minimal /dev set up by bwrap, and the
  same seccomp filter (`--seccomp`); the program keeps the caller's uid, with no capabilities.
- `userns`: the same namespaces as `namespaces` in an unprivileged user namespace; the program keeps the caller's uid
  (mapped), with no capabilities.
- `none`: only rlimits, the session, the scrubbed environment and (as root) the uid drop, after which the SysV IPC
  objects the slot's uid created are removed.

What this sandbox does NOT protect against:
- kernel exploits: the program shares the host kernel (namespaces are not a VM); use the remote executor, a container
  or a VM for code you believe to be actively malicious rather than merely buggy or reward-hacking;
- reading files: the whole file system stays readable (read-only), subject to the program's uid: in `bwrap`,
  `userns` and `none` modes it can read whatever the trainer's user can (e.g. a hub token in the home directory; in
  `userns` mode as root that includes root-only files);
- disk use: each file is capped at `file_size_mb`, but not their number; a program can fill the work directory's
  file system (the system temp dir, or `work_root`) until its time is up;
- CPU and memory contention with the trainer: memory is limited per process (`memory_mb` each, up to the process
  cap, plus /dev/shm up to `file_size_mb`), CPU time per process, and nothing reserves cores for the trainer;
- fork bombs where there is no process cap: in `bwrap`/`userns` modes without root (no pids cgroup) they are bounded
  only by the pid namespace teardown at the timeout; RLIMIT_NPROC is not used there, as it would count the trainer's
  own threads;
- anything in `none` mode beyond the limits: network and Unix sockets, writes wherever the user may write, reading
  other processes' environments, SysV IPC and POSIX message queues (removed afterwards only as root with the uid
  drop), processes that leave the session: they are killed at the end of the run only while one of the slot's
  cgroups still holds them. With the uid drop (as root) they stay there, as the slot's uid cannot write the cgroup
  files. Without it the accounting cgroup (cgroup v2, the only one without root) holds nothing for sure: the program
  has the trainer's uid, which may write to the trainer's cgroup, so it can write its pid into the parent group's
  `cgroup.procs`, escape, and outlive the run uncounted; as root it can leave any cgroup;
- a program that attacks the function-call harness from inside: it shares its interpreter, but it only produces the
  results, which are compared in the trainer's process, so at most it fails itself. Assert-style tests (HumanEval+)
  run in a separate harness process that the program cannot read or trace (see `code_reward`); in `none` mode as
  root without the uid drop the program could still trace it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import os
import queue
import secrets
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

from ._sandbox_boot import cgroup_pids, kill_cgroup, lock_is_free, remove_cgroup, remove_tree


logger = logging.getLogger(__name__)

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py")
ISOLATION_MODES = ("auto", "namespaces", "bwrap", "userns", "none")
_STATUSES = ("ok", "error", "timeout", "output_limit", "sandbox_error")
_OWNER_PREFIX = "trl-flowrl-sandbox-"
_CGROUP_V1_PIDS = "/sys/fs/cgroup/pids"
_CGROUP_PREFIX = "trl-flowrl-pids-"
_ACCT_PREFIX = "trl-flowrl-acct-"


@dataclass
class ExecutionResult:
    """The outcome of one program run.

    `status`: `"ok"` (exit code 0), `"error"` (non-zero exit, uncaught exception, killed by a limit), `"timeout"`
    (time limit, see the module docstring), `"output_limit"` (stdout/stderr over the cap), or `"sandbox_error"` (the
    executor itself failed, or the machine starved the program of CPU: an infrastructure problem, not the program's
    fault). `files` holds the fetched files that exist (text, capped). `cpu_s`: the program's CPU seconds, when they
    were measured (at the wall-clock limit).
    """

    status: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    cpu_s: float | None = None

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
    """Per-program limits. `timeout_s` is both the CPU-time budget and the wall-clock limit; a program starved of CPU
    gets up to `contention_grace` times that much wall time (see the module docstring)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    open_files: int = 64
    max_output_bytes: int = 16 * 1024 * 1024
    contention_grace: float = 3.0

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "file_size_mb", "open_files", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}.")
        if not self.contention_grace >= 1:
            raise ValueError(f"SandboxLimits.contention_grace must be >= 1, got {self.contention_grace!r}.")


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


# -- what this process owns, and its clean-up watchdog -------------------------------------------------------------


class _Owner:
    """Per process: one locked directory per work root (holding the run directories), the locks of the pids cgroups,
    and the clean-up watchdog (`_sandbox_boot.cleanup_after`), which is told about each of them.

    The flock of a directory is released by the kernel when its holder dies, however it dies: that is how the next
    start tells leftovers of a dead trainer from those of a live one (also across pid namespaces sharing /tmp).
    """

    def __init__(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.dirs: dict[str, tuple[str, int]] = {}
        self.cgroups: list[tuple[str, int]] = []
        self.watchdog_fd: int | None = None
        self.watchdog: subprocess.Popen | None = None

    def close_inherited(self) -> None:
        """In a forked child: drop the parent's descriptors (never unlocking: the parent still holds the locks)."""
        fds = [fd for _, fd in self.dirs.values()] + [fd for _, fd in self.cgroups]
        for fd in [*fds, self.watchdog_fd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _tell(self, kind: str, path: str) -> None:
        if self.watchdog_fd is None:
            read_end, self.watchdog_fd = os.pipe()
            try:
                self.watchdog = subprocess.Popen(
                    [sys.executable, "-I", "-S", _BOOT, "--cleanup", str(read_end)],
                    pass_fds=(read_end,),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                logger.warning(
                    "Cannot start the sandbox clean-up watchdog (%s): leftovers wait for the next start.", exc
                )
            finally:
                os.close(read_end)
        with contextlib.suppress(OSError):
            os.write(self.watchdog_fd, f"{kind} {path}\n".encode())

    def owner_dir(self, work_root: str) -> str:
        with self.lock:
            if work_root in self.dirs:
                return self.dirs[work_root][0]
            _sweep_stale_dirs(work_root)
            # Locked under a name the sweep ignores, then renamed: a sweep never sees it unlocked.
            pending = tempfile.mkdtemp(prefix=".trl-flowrl-new-", dir=work_root)
            fd = os.open(pending, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = os.path.join(work_root, f"{_OWNER_PREFIX}{self.pid}-{secrets.token_hex(4)}")
            os.rename(pending, path)
            os.chmod(path, 0o711)  # the slot uids must reach their own run directories inside
            self.dirs[work_root] = (path, fd)
            self._tell("dir", path)
            return path

    def add_cgroup(self, path: str, fd: int) -> None:
        with self.lock:
            self.cgroups.append((path, fd))
            self._tell("cgroup", path)

    def remove_all(self) -> None:
        """At interpreter exit: what the watchdog would do, done right away."""
        if self.pid != os.getpid():
            return
        for path, _ in self.dirs.values():
            remove_tree(path)
        _remove_cgroups([path for path, _ in self.cgroups])


_owner_state = _Owner()


def _owner() -> _Owner:
    return _owner_state


def _after_fork_in_child() -> None:
    global _owner_state
    _owner_state.close_inherited()
    _owner_state = _Owner()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lambda: _owner_state.remove_all())


def _sweep_stale_dirs(work_root: str) -> None:
    """Remove owner directories whose trainer is gone (nobody holds their lock)."""
    with contextlib.suppress(OSError), os.scandir(work_root) as entries:
        for entry in entries:
            owned = entry.name.startswith(_OWNER_PREFIX) and entry.is_dir(follow_symlinks=False)
            if owned and lock_is_free(entry.path):
                remove_tree(entry.path)


def _sweep_stale_cgroups(parent: str = _CGROUP_V1_PIDS, prefix: str = _CGROUP_PREFIX) -> None:
    """Remove the cgroups whose trainer is gone (nobody holds their lock), holding the lock while removing one: a
    trainer that has just made it and is about to lock it then finds it gone (see `_make_locked_cgroup`)."""
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_cgroup(entry.path, wait_s=1.0)
            except OSError:
                pass  # locked: its trainer is alive
            finally:
                os.close(fd)


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
        self._acct_cgroups: list[str | None] = [None] * max_concurrency
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
        self._acct_cgroups = _make_accounting_cgroups(self.max_concurrency)
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
                reason += (
                    f"; the interpreter {self.python} and its packages must be readable, and the work root "
                    f"{self.work_root} traversable, by an unprivileged uid"
                )
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
        files = {**files, "main.py": code}
        for name in files:
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"Sandbox file names must be plain names, got {name!r}.")
        uid = gid = self.uid_base + slot if drop_uid else None
        try:
            workdir = tempfile.mkdtemp(prefix="run-", dir=_owner().owner_dir(self.work_root))
        except OSError as exc:
            return ExecutionResult(
                "sandbox_error", detail=f"cannot create a work directory in {self.work_root}: {exc}"
            )
        try:
            for name, text in files.items():
                with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                    f.write(text)
            if drop_uid:
                for name in [".", *files]:
                    os.chown(os.path.join(workdir, name), uid, gid)
            os.chmod(workdir, 0o700)
            return self._execute(isolation, uid, gid, slot, workdir, stdin, fetch, timeout_s)
        except OSError as exc:
            return ExecutionResult("sandbox_error", detail=f"cannot prepare the work directory {workdir}: {exc}")
        finally:
            # Whatever the program left there (any depth, any permissions): never an exception out of the reward.
            if not remove_tree(workdir):
                logger.warning("Could not remove the sandbox work directory %s entirely.", workdir)
            if uid is not None and isolation == "none":
                _remove_sysv_ipc(uid)  # elsewhere the IPC namespace took them away

    def _slot_cgroups(self, slot: int) -> tuple[str | None, str | None]:
        """The slot's pids cgroup and accounting cgroup (either None where unavailable)."""
        if (self._cgroups[0] or self._acct_cgroups[0]) is not None and self._cgroups_pid != os.getpid():
            # A forked child gets cgroups of its own: the parent's are counted, and removed, by the parent.
            with self._mode_lock:
                if self._cgroups_pid != os.getpid():
                    if self._cgroups[0] is not None:
                        self._cgroups = _make_pids_cgroups(self.max_concurrency, self.limits.max_processes + 2)
                    if self._acct_cgroups[0] is not None:
                        self._acct_cgroups = _make_accounting_cgroups(self.max_concurrency)
                    self._cgroups_pid = os.getpid()
        return self._cgroups[slot], self._acct_cgroups[slot]

    def _execute(self, isolation, uid, gid, slot, workdir, stdin, fetch, timeout_s) -> ExecutionResult:
        limits = self.limits
        cpu = max(1, int(timeout_s + 0.999))
        rlimits = {
            # SIGXCPU at the budget (reported as a timeout), SIGKILL a second later if the program ignores it.
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": limits.file_size_mb * 1024 * 1024,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_CORE": 0,
            # Counted per uid: only meaningful when the program has a uid of its own.
            "RLIMIT_NPROC": limits.max_processes if uid is not None else None,
        }
        env = _clean_env(workdir)
        pids_cgroup, acct_cgroup = self._slot_cgroups(slot)
        argv = [self.python, "-I", "-B", "main.py"]
        if isolation == "bwrap":
            argv = _bwrap_command(workdir, env) + argv
        status_r, status_w = os.pipe()
        config = {
            "status_fd": status_w,
            "parent": os.getpid(),
            "isolation": "none" if isolation == "bwrap" else isolation,
            "wrapped": isolation == "bwrap",
            "workdir": workdir,
            "uid": uid,
            "gid": gid,
            "rlimits": rlimits,
            "argv": argv,
            "cgroup": pids_cgroup,
            "acct_cgroup": acct_cgroup,
            "env": env,
            "shm_mb": limits.file_size_mb,
        }
        accounting_start = _cgroup_usage(acct_cgroup)  # the slot's counters only ever grow: the run's are deltas
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
        run = _Run(proc, status_r, limits.max_output_bytes, pids_cgroup, wrapped=isolation == "bwrap")
        if accounting_start is not None:
            run.accounting = (acct_cgroup, accounting_start)
        try:
            outcome = run.communicate(stdin.encode(), start, timeout_s, limits.contention_grace)
        finally:
            run.close()
        wall = time.monotonic() - start
        stdout = run.out[1].decode("utf-8", errors="replace")
        stderr = run.out[2].decode("utf-8", errors="replace")[-8192:]
        cpu_s = run.usage.cpu if run.usage else None
        if not run.exec_started:
            detail = run.status_error or f"sandbox set-up failed (exit {proc.returncode})"
            return ExecutionResult("sandbox_error", proc.returncode, stdout, stderr, wall, detail=detail)
        if outcome == "contention":
            detail = (
                f"CPU contention: after {wall:.1f} s of wall time the program had had {run.usage.cpu:.2f} s of CPU "
                f"and waited {run.usage.waited():.1f} s for one ({run.usage.source}; its limit: {timeout_s:g} s); "
                "the machine is overloaded"
            )
            logger.warning("Sandbox run not scored: %s.", detail)
            return ExecutionResult("sandbox_error", proc.returncode, stdout, stderr, wall, detail=detail, cpu_s=cpu_s)
        fetched = {name: text for name in fetch if (text := _read_regular_file(workdir, name)) is not None}
        if outcome is None and proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            outcome = "timeout"  # killed by RLIMIT_CPU: it used its CPU-time budget
        if outcome is None:
            outcome = "ok" if proc.returncode == 0 else "error"
        return ExecutionResult(outcome, proc.returncode, stdout, stderr, wall, fetched, cpu_s=cpu_s)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The least CPU time over which the live processes' wait per CPU second is trusted as the exited ones' (see `_Usage`):
# about what the bootstrap and a Python program's start-up take, below which a parent's CPU is mostly wake-ups.
_MIN_RATE_CPU_S = 0.05


@dataclass(frozen=True)
class _Usage:
    """What a program's processes got from the machine since it started, in seconds.

    `cpu`: CPU time, exited processes included. `wait`: time runnable without a CPU. With `exact` (the slot's
    accounting cgroup: `cpu.stat`, and the wall time `cpu.pressure` says some process of the run waited) both include
    every process that ever ran; otherwise (/proc) `wait` is that of the live processes only, since the kernel drops a
    process's run-queue statistics when it is reaped, and `exited_cpu` is the CPU time of the reaped ones, whose wait
    is then estimated from the live ones' (`live_cpu` of CPU for `wait` of waiting).
    """

    cpu: float
    wait: float
    exact: bool = False
    exited_cpu: float = 0.0
    live_cpu: float = 0.0

    @property
    def source(self) -> str:
        return "the run's cgroup" if self.exact else "/proc, the exited processes' wait estimated"

    def waited(self) -> float:
        if self.exact or self.exited_cpu <= 0.0:
            return self.wait
        # An exited process is assumed to have waited as long per second of CPU as the live ones: a program that did
        # its work in short-lived children (8 in turn) looked idle, and so wrong, once they had been reaped. The rate
        # is taken over at least _MIN_RATE_CPU_S of CPU: live processes that mostly sleep or block have little CPU,
        # and their wake-up latencies divided by a few ms of it made tens of seconds of wait per CPU second, so a
        # program that sleeps or deadlocks after its children exited was held to the grace and skipped, not timed
        # out. No fixed cap on the rate: a cap R would score 0 a correct program working in children that the
        # machine gives less than 1/(2R + 2) of a CPU (a rate of 10 was measured beside 12 busy loops on 2 cores).
        return self.wait + self.exited_cpu * self.wait / max(self.live_cpu, _MIN_RATE_CPU_S)

    def starved(self, elapsed: float) -> bool:
        """Whether the program wanted the CPU for at least half of `elapsed` (ran or waited for one), rather than sleep
        or block: then a program short of its CPU budget at the wall limit was held back by the machine."""
        return self.cpu + self.waited() >= 0.5 * elapsed


def _cgroup_usage(path: str | None) -> tuple[float, float] | None:
    """(CPU seconds, seconds some task waited for a CPU) of a cgroup-v2 group so far, or None where unreadable."""
    if path is None:
        return None
    try:
        with open(os.path.join(path, "cpu.stat")) as f:
            usage = next(int(line.split()[1]) for line in f if line.startswith("usage_usec "))
        with open(os.path.join(path, "cpu.pressure")) as f:
            some = f.readline().split()
        if some[0] != "some" or not some[-1].startswith("total="):
            return None
        return usage / 1e6, int(some[-1][len("total=") :]) / 1e6
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _tree_usage(root: int) -> _Usage | None:
    """`_Usage` of the live processes under `root` (itself included) and of the children they reaped, from /proc; None
    where the kernel keeps no run-queue statistics."""
    cpu = wait = exited = live = 0.0
    measured = False
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
            fields = text[text.rindex(")") + 2 :].split()
            reaped = sum(int(x) for x in fields[13:15]) / _CLOCK_TICKS  # cutime, cstime
            cpu += sum(int(x) for x in fields[11:13]) / _CLOCK_TICKS + reaped  # + utime, stime
            exited += reaped
            tids = os.listdir(f"/proc/{pid}/task")
        except (OSError, ValueError):
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu, waiting = (int(x) / 1e9 for x in f.read().split()[:2])
                live += on_cpu
                wait += waiting
                measured = True
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/children") as f:
                stack.extend(int(child) for child in f.read().split())
    return _Usage(cpu, wait, exited_cpu=exited, live_cpu=live) if measured else None


class _Run:
    """Feeds stdin, collects capped stdout/stderr and the start-up status, and kills the tree at the time limit."""

    def __init__(self, proc, status_fd: int, max_output: int, cgroup: str | None = None, wrapped: bool = False):
        self.proc, self.status_fd, self.max_output, self.cgroup = proc, status_fd, max_output, cgroup
        self.wrapped = wrapped
        self.out = {1: b"", 2: b""}
        self.status_buffer = b""
        self.init_pidfd: int | None = None
        self.exec_started = False
        self.status_error = ""
        self.usage: _Usage | None = None
        self.accounting: tuple[str, tuple[float, float]] | None = None  # (cgroup, its figures before the start)
        self.accounted: tuple[float, float] | None = None  # the bootstrap's (CPU, wait) before it joined that cgroup

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
            elif text.startswith("ACCT "):
                with contextlib.suppress(ValueError):
                    cpu_ns, wait_ns = (int(x) for x in text[5:].split())
                    self.accounted = (cpu_ns / 1e9, wait_ns / 1e9)
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
        if self.init_pidfd is None:
            # No pid namespace (`none`, or bwrap once it is gone): what left the session is still in the slot's
            # cgroups, the pids one (as root) and the accounting one (where cgroup v2 is writable), unless it moved
            # itself out (see the module docstring). A leftover in the latter would also be counted as the next
            # program's CPU time.
            for path in (self.cgroup, self._joined_accounting()):
                if path is not None:
                    kill_cgroup(path)

    def _joined_accounting(self) -> str | None:
        return self.accounting[0] if self.accounting is not None and self.accounted is not None else None

    def wait_until_empty(self) -> None:
        """Without a pidfd (bwrap, `none`), wait for the slot's cgroups to empty (after the bootstrap was reaped)."""
        deadline = time.monotonic() + 10.0
        if self.cgroup is not None:
            while time.monotonic() < deadline and _cgroup_tasks(self.cgroup) > 0:
                time.sleep(0.01)
        accounting = self._joined_accounting()
        if accounting is not None and self.init_pidfd is None:
            while time.monotonic() < deadline and cgroup_pids(accounting):
                time.sleep(0.01)

    def measure(self) -> _Usage | None:
        """The run's usage so far: exact from its accounting cgroup where the bootstrap joined one (plus the bootstrap's
        start-up before it joined), else from /proc."""
        if self._joined_accounting() is not None:
            path, (cpu0, wait0) = self.accounting
            now = _cgroup_usage(path)
            if now is not None:
                cpu, wait = now[0] - cpu0 + self.accounted[0], now[1] - wait0 + self.accounted[1]
                return _Usage(cpu, wait, exact=True)
        return _tree_usage(self.proc.pid)

    def _over_time(self, elapsed: float, budget: float, final: bool) -> str | None:
        """At or past the wall limit: `"timeout"`, `"contention"`, or None to let a CPU-starved program go on."""
        self.usage = self.measure()
        if self.usage is None or not self.exec_started:
            return "timeout"
        if self.usage.cpu >= budget or not self.usage.starved(elapsed):
            return "timeout"  # it had its CPU time, or it did not want it (asleep, blocked)
        return "contention" if final else None

    def communicate(self, stdin: bytes, start: float, budget: float, grace: float = 1.0) -> str | None:
        """Returns `"timeout"`, `"output_limit"` or `"contention"` if the run was killed for it, else None once it has
        exited. `budget` is the wall-clock limit and CPU-time budget, `grace` the starved program's allowance."""
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
        deadline, backstop = start + budget, start + budget * max(1.0, grace)
        verdict = None
        draining = False
        try:
            while verdict is None:
                now = time.monotonic()
                if now >= deadline:
                    if not draining and proc.poll() is not None:
                        # It exited on its own (a late wake-up of this thread, not a slow program): read what it
                        # wrote instead of judging it. Pipes a background child still holds are judged after 1 s.
                        draining = True
                        deadline = now + 1.0
                        continue
                    verdict = self._over_time(now - start, budget, now >= backstop)
                    deadline = min(now + 0.2, backstop)
                    continue
                wait_s = min(deadline - now, 1.0)
                if not sel.get_map():
                    # Pipes closed (by the program or at its exit): wait for the process itself.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=wait_s)
                        break
                    continue
                for key, _ in sel.select(wait_s):
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
        finally:
            sel.close()
        if verdict:
            self.kill()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.kill()
                proc.wait()
        # A background child of the program may still be alive: the tree goes at the end of the run.
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


def _make_locked_cgroup(parent: str, prefix: str, slot: int, attempts: int = 3) -> str:
    """Make a cgroup under `parent`, flock'ed for as long as this process lives, and tell the watchdog about it.

    Between the mkdir and the flock another trainer's sweep (`_sweep_stale_cgroups`) may find the new group unlocked
    and remove it, holding its lock meanwhile: so once locked, the group is checked to still be the one made, and made
    again under a new name if it was taken. (A cgroup v2 group cannot be renamed, so it cannot be made under a name
    the sweep ignores and renamed once locked, as the work directories are.)
    """
    for _ in range(attempts):
        path = os.path.join(parent, f"{prefix}{os.getpid()}-{next(_cgroup_ids)}-{slot}")
        os.mkdir(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            kept = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            kept = False
        if kept:
            _owner().add_cgroup(path, fd)
            return path
        os.close(fd)
    raise OSError(f"the cgroups made under {parent} were removed by other processes {attempts} times in a row")


def _make_pids_cgroups(count: int, max_tasks: int) -> list[str | None]:
    """One cgroup-v1 pids cgroup per slot capping its task count (as root); `[None] * count` where unavailable.

    RLIMIT_NPROC does not apply to root's uid, so this is what stops a fork bomb of a program that keeps uid 0 (the
    `userns` mode as root). Each is flock'ed for as long as this process lives, removed at interpreter exit, by the
    watchdog if this process is killed, or at the next start if both were.
    """
    if not os.path.isdir(_CGROUP_V1_PIDS):
        return [None] * count
    _sweep_stale_cgroups()
    paths: list[str | None] = []
    try:
        for slot in range(count):
            path = _make_locked_cgroup(_CGROUP_V1_PIDS, _CGROUP_PREFIX, slot)
            paths.append(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_tasks))
    except OSError:
        _remove_cgroups(paths)
        return [None] * count
    atexit.register(_remove_cgroups, list(paths), os.getpid())
    return paths


def _cgroup2_home() -> str | None:
    """This process's own cgroup-v2 directory (where it can be written), under which the accounting cgroups go: the
    programs then stay inside the trainer's cgroup and its limits. None without a cgroup-v2 mount or write access."""
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line.rstrip("\n")[3:] for line in f if line.startswith("0::"))
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except (OSError, StopIteration):
        return None
    for fields in mounts:
        if "-" not in fields:
            continue
        fstype = fields[fields.index("-") + 1]
        root, mount_point = fields[3], fields[4]
        if fstype == "cgroup2" and (own == root or own.startswith(root.rstrip("/") + "/")):
            home = os.path.normpath(os.path.join(mount_point, os.path.relpath(own, root)))
            return home if os.access(home, os.W_OK) else None
    return None


def _make_accounting_cgroups(count: int) -> list[str | None]:
    """One cgroup-v2 group per slot, under this process's own, whose `cpu.stat` and `cpu.pressure` (PSI) give the CPU
    time and run-queue wait of every process of a run, exited ones included (see `_Usage`); `[None] * count` where
    that is unavailable (no cgroup v2 or PSI, no write access: then the figures come from /proc). Only counters: no
    controller is enabled, so the programs keep the trainer's limits. Locked, removed and swept as the pids cgroups.
    """
    home = _cgroup2_home()
    if home is None:
        return [None] * count
    _sweep_stale_cgroups(home, _ACCT_PREFIX)
    paths: list[str | None] = []
    try:
        for slot in range(count):
            path = _make_locked_cgroup(home, _ACCT_PREFIX, slot)
            paths.append(path)
            if _cgroup_usage(path) is None:
                raise OSError(f"no cpu.stat / cpu.pressure in {path}")
    except OSError:
        _remove_cgroups(paths)
        return [None] * count
    atexit.register(_remove_cgroups, list(paths), os.getpid())
    return paths


def _remove_cgroups(paths, owner: int | None = None) -> None:
    if owner is not None and owner != os.getpid():  # a forked child must not remove its parent's cgroups
        return
    for path in paths:
        if path is not None:
            with contextlib.suppress(OSError):
                os.rmdir(path)


_IPC_RMID = 0
_SYSV_IPC = (("shm", "shmid"), ("sem", "semid"), ("msg", "msqid"))


def _remove_sysv_ipc(uid: int) -> None:
    """Remove the SysV shared memory segments, semaphore sets and message queues created by `uid` (`none` mode)."""
    libc = ctypes.CDLL(None, use_errno=True)
    remove = {"shm": lambda i: libc.shmctl(i, _IPC_RMID, None), "sem": lambda i: libc.semctl(i, 0, _IPC_RMID)}
    remove["msg"] = lambda i: libc.msgctl(i, _IPC_RMID, None)
    for kind, id_column in _SYSV_IPC:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = [line.split() for line in f]
            at_id, at_cuid = header.index(id_column), header.index("cuid")
        except (OSError, ValueError):
            continue
        for row in rows:
            with contextlib.suppress(ValueError, IndexError):
                if int(row[at_cuid]) == uid:
                    remove[kind](int(row[at_id]))


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
