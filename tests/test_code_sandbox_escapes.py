"""Hostile programs against the local sandbox and the code reward: clean-up, IPC, sockets, devices, the assert harness,
death of the trainer and CPU contention (issue 11, items 1-5, 7, 8)."""

import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest

from trl_flowrl.rewards import CodeReward, LocalSandbox, SandboxLimits, _sandbox_boot, code_sandbox
from trl_flowrl.rewards.code_reward import run_tests
from trl_flowrl.rewards.code_sandbox import _CGROUP_PREFIX, _CGROUP_V1_PIDS, _Run, _Usage


TIMEOUT = 2.0
SUM_TESTS = {"style": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]}
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def block(code: str) -> list[dict]:
    return [{"role": "assistant", "content": f"```python\n{code.strip()}\n```"}]


def mode_sandbox(mode: str, **limits) -> LocalSandbox:
    """A sandbox in `mode` ("auto" is what this machine picks); an interpreter an unprivileged uid can read where the
    mode drops the uid (namespaces, and none as root)."""
    python = None
    if mode in ("namespaces", "none") and os.geteuid() == 0:
        if SYSTEM_PYTHON is None:
            pytest.skip(f"{mode} mode as root needs a system python3")
        python = SYSTEM_PYTHON
    limits = {"timeout_s": TIMEOUT, "max_processes": 16, **limits}
    sandbox = LocalSandbox(SandboxLimits(**limits), isolation=mode, python=python)
    try:
        detected = sandbox.isolation  # detection now, not in the middle of a test
    except RuntimeError as exc:
        pytest.skip(f"{mode} isolation unavailable here: {exc}")
    assert mode in ("auto", detected)
    return sandbox


@pytest.fixture(scope="module")
def sandbox():
    return mode_sandbox("auto")


@pytest.fixture
def work_root():
    """A work root on tmpfs where there is one (removing 3,000 directories from a disk mounted with `discard` takes
    seconds), readable by the slot uids of the namespaces mode (pytest's tmp_path is not)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix="trl-flowrl-test-", dir=base)
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


NAMESPACE_MODES = ["auto", "userns", "namespaces"]


@pytest.fixture(scope="module", params=NAMESPACE_MODES)
def ns_sandbox(request):
    sandbox = mode_sandbox(request.param)
    if sandbox.isolation not in ("userns", "namespaces"):
        pytest.skip(f"this machine runs programs in {sandbox.isolation!r} mode")
    return sandbox


# -- 1. nothing a program leaves behind makes the reward raise ----------------------------------------------------

NEST = "import os\nprint(os.getcwd(), flush=True)\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"


@pytest.mark.parametrize("mode", ["auto", "namespaces", "none"])
def test_deeply_nested_directories_are_removed_without_raising(mode, tmp_path, work_root):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    sandbox = mode_sandbox(mode)
    sandbox.work_root = str(work_root)
    # 3,000 levels (shutil.rmtree's recursion limit), a symlink out of the tree, a file and a directory without
    # permissions at the bottom.
    code = NEST + f"os.symlink({str(outside)!r}, 'link')\nopen('f', 'w').write('x')\nos.mkdir('locked')\n"
    code += "os.chmod('locked', 0)\nos.chmod('f', 0)\nos.chdir('..')\nos.chmod('d', 0o500)\n"
    result = sandbox.run(code)
    assert result.status == "ok", result
    workdir = result.stdout.split()[0]
    assert not os.path.exists(workdir)
    assert (outside / "keep.txt").read_text() == "keep"  # the symlink was removed, not followed

    reward = CodeReward(sandbox, timeout_per_test=TIMEOUT)
    nested_but_right = NEST.replace("print(os.getcwd(), flush=True)\n", "") + SUM_OK
    assert reward([block(nested_but_right), block(NEST + "print(0)")], tests=[SUM_TESTS] * 2) == [1.0, 0.0]
    assert [p.name for p in work_root.iterdir() for _ in p.iterdir()] == []  # no run directory left


def test_an_executor_that_raises_is_an_infra_error():
    class Raising:
        max_concurrency = 1

        def run(self, code, stdin="", files=None, fetch=(), timeout_s=None):
            raise RecursionError("maximum recursion depth exceeded")

    metrics = {}
    reward = CodeReward(Raising())
    assert reward([block(SUM_OK)], tests=[SUM_TESTS], log_metric=metrics.__setitem__) == [None]
    assert metrics["code_reward/infra_error"] == 1.0


# -- 2. SysV IPC does not outlive the program ---------------------------------------------------------------------

IPC_SIZE = 1_234_567 + secrets.randbelow(1000)
IPC_PROGRAM = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
print(libc.shmget(0, {IPC_SIZE}, IPC_CREAT | 0o600), libc.semget(0, 3, IPC_CREAT | 0o600),
      libc.msgget(0, IPC_CREAT | 0o600))
"""


def _sysv_objects() -> dict[str, set[str]]:
    found = {}
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as f:
            found[kind] = {" ".join(line.split()[:4]) for line in list(f)[1:]}
    return found


@pytest.mark.parametrize("mode", ["auto", "namespaces", "none"])
def test_sysv_ipc_objects_are_gone_after_the_run(mode):
    sandbox = mode_sandbox(mode)
    if sandbox.isolation == "none" and os.geteuid() != 0:
        pytest.skip("none mode without root: documented as not cleaned up")
    before = _sysv_objects()
    result = sandbox.run(IPC_PROGRAM)
    assert result.status == "ok", result
    assert all(int(x) >= 0 for x in result.stdout.split()), result.stdout  # the program did create them
    after = _sysv_objects()
    assert {kind: after[kind] - before[kind] for kind in after} == {"shm": set(), "sem": set(), "msg": set()}


# -- 3. no host Unix socket is reachable ---------------------------------------------------------------------------


@contextlib.contextmanager
def _listeners(tmp_path: Path):
    os.chmod(tmp_path, 0o755)
    listeners = []
    addresses = {
        "root_only": str(tmp_path / "root-only.sock"),
        "world_writable": str(tmp_path / "open.sock"),
        "abstract": "\0trl-flowrl-test-" + secrets.token_hex(4),
    }
    try:
        for name, address in addresses.items():
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(address)
            listener.listen(4)
            listener.setblocking(False)
            listeners.append(listener)
            if name != "abstract":
                os.chmod(address, 0o600 if name == "root_only" else 0o777)
        yield addresses, listeners
    finally:
        for listener in listeners:
            listener.close()


SOCKET_PROGRAM = """
import multiprocessing, os, socket
for name, address in {addresses!r}.items():
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(address)
        s.sendall(b"pwned")
        print("CONNECTED", name)
    except OSError as exc:
        print("blocked", name, exc.errno)
for family in ("AF_VSOCK", "AF_NETLINK", "AF_PACKET", "AF_UNIX"):
    try:
        socket.socket(getattr(socket, family), socket.SOCK_DGRAM if family == "AF_NETLINK" else socket.SOCK_STREAM)
        print("CREATED", family)
    except OSError as exc:
        print("refused", family)
a, b = socket.socketpair()
a.sendall(b"x")
here, there = multiprocessing.Pipe()
there.send([1, 2])
print("socketpair", b.recv(1), here.recv())
"""


def test_no_host_unix_socket_is_reachable(ns_sandbox, tmp_path):
    with _listeners(tmp_path) as (addresses, listeners):
        result = ns_sandbox.run(SOCKET_PROGRAM.format(addresses=addresses))
        assert result.status == "ok", result
        assert "CONNECTED" not in result.stdout and "CREATED" not in result.stdout, result.stdout
        assert result.stdout.count("blocked") == 3 and result.stdout.count("refused") == 4
        assert "socketpair b'x' [1, 2]" in result.stdout  # the program may still talk to itself
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()


# -- 4. a minimal /dev -----------------------------------------------------------------------------------------------

DEV_PROGRAM = """
import glob, multiprocessing, os
for path in ["/dev/kvm", "/dev/loop-control", "/dev/fuse", "/dev/net/tun", "/dev/vsock", "/dev/kmsg", "/dev/vda",
             "/dev/userfaultfd", "/dev/mem", "/dev/tty", "/dev/console"] + glob.glob("/dev/loop*") + glob.glob("/dev/sd*"):
    try:
        os.close(os.open(path, os.O_RDWR))
        print("OPENED", path)
    except OSError:
        pass
print("DEV", sorted(os.listdir("/dev")))
with open("/dev/null", "w") as f:
    f.write("x")
assert len(open("/dev/urandom", "rb").read(16)) == 16 and open("/dev/zero", "rb").read(2) == b"\\0\\0"
open("/dev/shm/{marker}", "w").write("private")
lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm
with lock:
    print("shm ok")
"""


def test_the_program_gets_a_minimal_dev(ns_sandbox):
    marker = "trl-flowrl-" + secrets.token_hex(4)
    result = ns_sandbox.run(DEV_PROGRAM.format(marker=marker))
    assert result.status == "ok", result
    assert "OPENED" not in result.stdout, result.stdout
    listing = next(line for line in result.stdout.splitlines() if line.startswith("DEV"))
    expected = ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert listing == f"DEV {expected}"
    assert "shm ok" in result.stdout
    assert not os.path.exists(f"/dev/shm/{marker}")  # its /dev/shm is its own, and gone


# -- 5. assert-style tests cannot be passed by a wrong function -------------------------------------------------

ASSERT_TESTS = {
    "style": "assert",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
    "prelude": "",
}
WRONG = {
    "always_equal": """
class Anything:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
""",
    "int_subclass": """
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Int(0)
""",
    "patched_exec": """
import builtins
real_exec = builtins.exec
def fake_exec(code, globals=None, *args, **kwargs):
    if getattr(code, "co_filename", "") == "test.py":
        globals["check"] = lambda candidate: None
        return None
    return real_exec(code, globals, *args, **kwargs)
builtins.exec = fake_exec
def add(a, b):
    return 0
""",
    "forged_record": """
import __main__, json, os, re, sys
nonces = set()
for value in vars(__main__).values():
    if isinstance(value, bytes):
        value = value.decode(errors="ignore")
    if isinstance(value, str) and re.fullmatch("[0-9a-f]{32}", value):
        nonces.add(value)
frame = sys._getframe()
while frame is not None:
    nonces.update(v for v in frame.f_globals.values() if isinstance(v, str) and re.fullmatch("[0-9a-f]{32}", v))
    frame = frame.f_back
for path in ("/proc/self/fd/0", f"/proc/{os.getppid()}/fd/0", f"/proc/{os.getppid()}/environ"):
    try:
        nonces.update(re.findall("[0-9a-f]{32}", open(path, errors="ignore").read()))
    except OSError:
        pass
for nonce in nonces:
    for path in ("/proc/self/fd/1", f"/proc/{os.getppid()}/fd/1", "/dev/stdout"):
        try:
            with open(path, "w") as f:
                f.write(f"{nonce} passed\\n")
        except OSError:
            pass
    json.dump({"nonce": nonce}, open("done.json", "w"))
    print(f"{nonce} passed", flush=True)
os._exit(0)
""",
    "reads_the_expected_values": """
import __main__, glob, re
source = ""
spec = getattr(__main__, "spec", None)
if isinstance(spec, dict):
    source += spec.get("test", "")
for path in glob.glob("*"):
    try:
        source += open(path).read()
    except OSError:
        pass
answers = {(int(a), int(b)): int(c) for a, b, c in re.findall(r"candidate\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)", source)}
def add(a, b):
    return answers.get((a, b), 42)
""",
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_functions_fail_assert_tests(ns_sandbox, name):
    reward = CodeReward(ns_sandbox, timeout_per_test=TIMEOUT)
    assert reward([block(WRONG[name])], tests=[ASSERT_TESTS]) == [0.0]


def test_assert_harness_keeps_what_tests_rely_on(sandbox):
    # A helper of the solution the test calls (HumanEval's `poly`), expected exceptions, keyword arguments, tuples,
    # sets, dicts, big integers, floats, numpy scalars and bytes all reach the test code as plain values.
    tests = {
        "style": "assert",
        "entry_point": "f",
        "prelude": "import math\n",
        "test": textwrap.dedent(
            """
            import numpy as np
            def check(candidate):
                assert candidate(2) == (double(2) + 1, {1, 2}, {"k": [1.5]}, 10**5000, b"ab")
                assert candidate(x=3)[0] == 7 and type(candidate(3)[0]) is int
                assert candidate("mean") == 2.0 and type(candidate("mean")) is float
                try:
                    candidate(-1)
                except ValueError:
                    pass
                else:
                    raise AssertionError("no ValueError")
            """
        ),
    }
    solution = textwrap.dedent(
        """
        import numpy as np
        def double(x):
            return 2 * x
        def f(x):
            if x == "mean":
                return np.mean([1.0, 3.0])
            if x < 0:
                raise ValueError("negative")
            return (double(x) + 1, {1, 2}, {"k": [1.5]}, 10**5000, b"ab")
        """
    )
    assert run_tests(solution, tests, sandbox, timeout_per_test=5).all_passed
    assert not run_tests(solution.replace("2 * x", "3 * x"), tests, sandbox, timeout_per_test=5).all_passed


# -- 7. nothing outlives a trainer killed with SIGKILL ------------------------------------------------------------

# A trainer process. It loads the sandbox modules alone: importing the `trl_flowrl` package (torch, trl) would take
# seconds.
TRAINER = f"""
import sys, types
for name, path in (("trl_flowrl", {str(Path(__file__).parents[1] / "trl_flowrl")!r}),
                   ("trl_flowrl.rewards", {str(Path(__file__).parents[1] / "trl_flowrl" / "rewards")!r})):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [path]
from trl_flowrl.rewards.code_sandbox import LocalSandbox, SandboxLimits
work_root, mode, python, program = sys.argv[1:5]
sandbox = LocalSandbox(SandboxLimits(timeout_s=60), isolation=mode, python=python or None, work_root=work_root)
print(sandbox.isolation, flush=True)
sandbox.run(program)
"""


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
    return found


def _children(pid: int) -> list[int]:
    children = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
    return children


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _own_cgroups(pid: int) -> list[str]:
    """The pids cgroups and the accounting cgroups (cgroup v2, see `_Usage`) of the trainer `pid`."""
    found = []
    for parent, prefix in (
        (_CGROUP_V1_PIDS, _CGROUP_PREFIX),
        (code_sandbox._cgroup2_home(), code_sandbox._ACCT_PREFIX),
    ):
        if parent is not None and os.path.isdir(parent):
            found += [name for name in os.listdir(parent) if name.startswith(f"{prefix}{pid}-")]
    return found


@pytest.mark.parametrize("mode", ["auto", "namespaces", "none"])
def test_nothing_outlives_a_killed_trainer(mode, work_root):
    tmp_path = work_root
    mode_sandbox(mode)  # skips where the mode is unavailable
    python = SYSTEM_PYTHON if mode in ("namespaces", "none") and os.geteuid() == 0 else ""
    token = f"1000.{secrets.randbelow(10**9):09d}"  # a unique `sleep` argument to find the program's processes by
    program = f"import os\nif os.fork() == 0:\n    os.execv('/bin/sleep', ['sleep', '{token}'])\n"
    program += f"os.execv('/bin/sleep', ['sleep', '{token}'])\n"
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(tmp_path), mode, python, program], stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout.readline().strip() in ("userns", "namespaces", "none", "bwrap")
        deadline = time.monotonic() + 20
        while len(_processes_with(token)) < 2:
            assert time.monotonic() < deadline, "the program did not start"
            time.sleep(0.05)
        started = _children(trainer.pid)  # the bootstrap and the clean-up watchdog
        assert started and list(tmp_path.iterdir())
        if os.geteuid() == 0 and os.path.isdir(_CGROUP_V1_PIDS):
            assert _own_cgroups(trainer.pid)
        if code_sandbox._cgroup2_home() is not None:  # the accounting cgroups go with the trainer too
            assert any(name.startswith(code_sandbox._ACCT_PREFIX) for name in _own_cgroups(trainer.pid))
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 10
    while _processes_with(token) or any(map(_alive, started)) or list(tmp_path.iterdir()) or _own_cgroups(trainer.pid):
        assert time.monotonic() < deadline, (
            _processes_with(token),
            [p for p in started if _alive(p)],
            list(tmp_path.iterdir()),
            _own_cgroups(trainer.pid),
        )
        time.sleep(0.05)


@pytest.mark.parametrize("cgroup", ["pids", "accounting"])
def test_none_mode_kills_what_left_the_session_at_the_end_of_the_run(cgroup, monkeypatch):
    if cgroup == "pids" and (os.geteuid() != 0 or not os.path.isdir(_CGROUP_V1_PIDS)):
        pytest.skip("documented: without root (no pids cgroup) `none` mode cannot find what left the session")
    if cgroup == "accounting":
        if code_sandbox._cgroup2_home() is None:
            pytest.skip("documented: without a writable cgroup v2 `none` mode cannot find what left the session")
        monkeypatch.setattr(code_sandbox, "_make_pids_cgroups", lambda count, max_tasks: [None] * count)
    sandbox = mode_sandbox("none")
    assert (sandbox._cgroups[0] is not None) == (cgroup == "pids")
    token = f"1000.{secrets.randbelow(10**9):09d}"
    code = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    null = os.open('/dev/null', os.O_RDWR)\n"
        "    for fd in (0, 1, 2):\n        os.dup2(null, fd)\n"  # it holds no pipe of the run: the run ends at once
        f"    os.execv('/bin/sleep', ['sleep', '{token}'])\nprint(1)"
    )
    assert sandbox.run(code).stdout == "1\n"
    assert _processes_with(token) == []


def test_none_mode_kills_what_left_the_session_without_reading_pids(monkeypatch):
    # Pids read from cgroup.procs may have been reused by unrelated processes by the time they are signalled: where
    # cgroup v2 has cgroup.kill (Linux 5.14+), the end of the run kills the accounting cgroup without reading them.
    if code_sandbox._cgroup2_home() is None:
        pytest.skip("documented: without a writable cgroup v2 `none` mode cannot find what left the session")
    monkeypatch.setattr(code_sandbox, "_make_pids_cgroups", lambda count, max_tasks: [None] * count)
    sandbox = mode_sandbox("none")
    if not os.path.exists(os.path.join(sandbox._acct_cgroups[0], "cgroup.kill")):
        pytest.skip("no cgroup.kill (Linux < 5.14): the pids are read and checked through pidfds")
    for module in (code_sandbox, _sandbox_boot):
        monkeypatch.setattr(module, "cgroup_pids", lambda path: [])  # no pid list to go by
    token = f"1000.{secrets.randbelow(10**9):09d}"
    code = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    null = os.open('/dev/null', os.O_RDWR)\n"
        "    for fd in (0, 1, 2):\n        os.dup2(null, fd)\n"
        f"    os.execv('/bin/sleep', ['sleep', '{token}'])\nprint(1)"
    )
    try:
        assert sandbox.run(code).stdout == "1\n"
        deadline = time.monotonic() + 5
        while _processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(token) == []
    finally:
        for pid in _processes_with(token):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_cgroup_kill_never_signals_a_pid_that_left_the_group(tmp_path, monkeypatch):
    # Without cgroup.kill (cgroup v1's pids cgroups, kernels before 5.14) the pids are read: one listed, then reaped
    # and its number reused by a process outside the group, must not be killed. The group here is a plain directory
    # (no cgroup.kill, and none may be created) whose member list is given: first both processes, then the member.
    member, stranger = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    lists = iter([[stranger.pid, member.pid], [member.pid]])
    monkeypatch.setattr(_sandbox_boot, "cgroup_pids", lambda path: next(lists, []))
    (tmp_path / "group").mkdir()
    try:
        assert _sandbox_boot.remove_cgroup(str(tmp_path / "group"), wait_s=1.0)  # what the watchdog and sweeps do
        assert member.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        for process in (member, stranger):
            process.kill()
            process.wait()


@pytest.mark.parametrize("kind", ["pids", "accounting"])
def test_a_sweep_between_mkdir_and_lock_does_not_take_a_new_cgroup(kind, monkeypatch):
    # Two trainers starting at once (DDP ranks of one node, one cgroup): B's sweep of stale groups may look at A's
    # new group after A's mkdir and before A's flock, find it unlocked and remove it. A must still end up with
    # groups of its own, not fall back to none (no process cap; /proc's estimates instead of the cgroup's figures).
    if kind == "pids":
        if os.geteuid() != 0 or not os.path.isdir(_CGROUP_V1_PIDS):
            pytest.skip("pids cgroups are made as root on cgroup v1 only")
        parent, prefix = _CGROUP_V1_PIDS, _CGROUP_PREFIX
        make = functools.partial(code_sandbox._make_pids_cgroups, 2, 10)
    else:
        parent, prefix = code_sandbox._cgroup2_home(), code_sandbox._ACCT_PREFIX
        if parent is None:
            pytest.skip("no writable cgroup v2 here")
        make = functools.partial(code_sandbox._make_accounting_cgroups, 2)
    real_flock, swept = code_sandbox.fcntl.flock, []

    def flock_after_another_sweep(fd, operation):
        if operation == code_sandbox.fcntl.LOCK_EX and not swept:  # A's first lock: B's sweep gets there first
            swept.append(os.readlink(f"/proc/self/fd/{fd}"))
            code_sandbox._sweep_stale_cgroups(parent, prefix)
        return real_flock(fd, operation)

    monkeypatch.setattr(
        code_sandbox, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": flock_after_another_sweep})
    )
    paths = make()
    try:
        assert swept and not os.path.exists(swept[0])  # the race happened: the first group was taken
        assert all(path is not None and os.path.isdir(path) for path in paths), paths
        assert not any(map(_sandbox_boot.lock_is_free, paths))  # locked, so no later sweep takes them either
    finally:
        code_sandbox._remove_cgroups(paths)


def test_leftovers_of_a_dead_trainer_are_removed_at_the_next_start(tmp_path):
    # Both the trainer and its watchdog killed (a whole job killed at once): the next start removes what they left.
    script = TRAINER.replace("sandbox.run(program)", "sandbox.run('print(1)')\nimport os\nos.kill(os.getpid(), 9)")
    trainer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "auto", "", ""], start_new_session=True)
    watchdogs = []
    while trainer.poll() is None:
        watchdogs = _children(trainer.pid) or watchdogs
        time.sleep(0.005)
    for pid in watchdogs:  # kill the watchdog too (it may already have cleaned up)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    leftover = tmp_path / "trl-flowrl-sandbox-1-deadbeef"  # as a dead trainer leaves it: nobody holds its lock
    (leftover / "run-x" / "d").mkdir(parents=True)
    live = LocalSandbox(SandboxLimits(timeout_s=TIMEOUT), work_root=str(tmp_path))
    assert live.run("print(2)").stdout.strip() == "2"
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 1 and names[0].startswith(f"trl-flowrl-sandbox-{os.getpid()}-")


# -- 8. CPU contention is not a wrong answer --------------------------------------------------------------------


@contextlib.contextmanager
def cpu_hogs(count: int):
    """`count` busy loops, each in its own session (so autogroup scheduling gives each an equal share), pinned with
    the calling thread (and so the programs it starts) to one CPU."""
    cpu = min(os.sched_getaffinity(0))
    previous = os.sched_getaffinity(0)
    hog = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog], start_new_session=True) for _ in range(count)]
    os.sched_setaffinity(0, {cpu})
    try:
        time.sleep(0.3)
        yield
    finally:
        os.sched_setaffinity(0, previous)
        for process in hogs:
            process.kill()
            process.wait()


# A correct program that needs 0.6 s of CPU: well within its 1 s limit on an idle CPU.
NEEDS_CPU = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    pass\n" + SUM_OK


@pytest.fixture(scope="module")
def contended():
    return mode_sandbox("auto", timeout_s=1.0, contention_grace=3.0)


def test_a_starved_correct_program_is_an_infra_error_not_a_wrong_answer(contended):
    reward = CodeReward(contended, timeout_per_test=1.0)
    metrics = {}
    with cpu_hogs(8):  # the program gets about 1/9 of a CPU: 0.6 s of CPU would take ~5 s, over the 3 s grace
        start = time.monotonic()
        result = contended.run(NEEDS_CPU, stdin="1 2\n")
        elapsed = time.monotonic() - start
        scores = reward([block(NEEDS_CPU)], tests=[SUM_TESTS], log_metric=metrics.__setitem__)
    assert result.status == "sandbox_error" and result.detail.startswith("CPU contention"), result
    assert result.cpu_s is not None and result.cpu_s < 0.6
    assert elapsed < 3.0 + 2.0
    assert scores == [None] and metrics["code_reward/infra_error"] == 1.0


def test_a_slowed_correct_program_gets_more_wall_time(contended):
    with cpu_hogs(2):  # about 1/3 of a CPU: 0.6 s of CPU takes ~2 s, over the 1 s limit, within the grace
        result = contended.run(NEEDS_CPU, stdin="1 2\n")
    assert result.status == "ok" and result.stdout == "3\n", result
    assert result.wall_s > 1.0  # it did need the extra time


def test_infinite_loops_and_sleeps_stay_timeouts_under_contention(contended):
    with cpu_hogs(1):
        loop = contended.run("while True:\n    pass")  # it burns its 1 s of CPU, by ~2 s of wall time
        sleep = contended.run("import time\ntime.sleep(1000)")  # it wanted no CPU: wrong at the 1 s limit
    assert loop.status == "timeout", loop
    assert sleep.status == "timeout" and sleep.wall_s < 2.0, sleep
    reward = CodeReward(contended, timeout_per_test=1.0)
    assert reward([block("while True:\n    pass"), block("import time\ntime.sleep(1000)")], tests=[SUM_TESTS] * 2) == [
        0.0,
        0.0,
    ]


# -- issue 17, item 2: starvation of programs that work in child processes ----------------------------------------

# A correct program that does its work (0.4 s of CPU) in 8 child processes, one after the other: the kernel drops the
# run-queue statistics of each child once it is reaped, so the time the starved children waited was lost.
IN_CHILDREN = (
    "import subprocess, sys\n"
    "work = 'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.05:\\n    pass'\n"
    "for _ in range(8):\n"
    "    subprocess.run([sys.executable, '-S', '-c', work], check=True)\n" + SUM_OK
)


def _judge(usage, elapsed=2.4, budget=1.0, final=False, exact=None):
    """The verdict of `_Run._over_time` on figures given instead of measured: `usage` is what /proc shows, `exact`
    what the run's accounting cgroup shows (the bootstrap's start-up included), if it has one."""
    run = _Run(types.SimpleNamespace(pid=-1), -1, 0)
    run.exec_started = True
    if exact is not None:
        run.accounting, run.accounted = ("cgroup", (10.0, 20.0)), (0.0, 0.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(code_sandbox, "_tree_usage", lambda pid: usage)
        patch.setattr(code_sandbox, "_cgroup_usage", lambda path: (10.0 + exact[0], 20.0 + exact[1]))
        return run._over_time(elapsed, budget, final)


def test_starvation_decision_counts_the_wait_of_exited_children():
    # Measured at the 2.4 s check of IN_CHILDREN-like program beside 12 busy loops on 2 cores: live processes had
    # waited 0.69 s, the reaped children had had 0.21 s of CPU; the run's cgroup said 0.29 s of CPU, 2.10 s waited.
    starved = _Usage(cpu=0.26, wait=0.69, exited_cpu=0.21, live_cpu=0.07)
    assert starved.waited() == pytest.approx(0.69 + 0.21 * 0.69 / 0.07)
    assert _judge(starved) is None  # it goes on, up to the grace
    assert _judge(starved, final=True) == "contention"  # then an infrastructure error, never a wrong answer
    assert _judge(None, exact=(0.29, 2.10)) is None
    assert _judge(None, exact=(0.29, 2.10), final=True) == "contention"
    # A program that ran a child and then sleeps: little CPU, little waiting, by either measure.
    sleeper = _Usage(cpu=0.06, wait=0.05, exited_cpu=0.03, live_cpu=0.03)
    assert _judge(sleeper) == "timeout"
    assert _judge(None, exact=(0.06, 0.1)) == "timeout"
    # Its CPU budget spent: a timeout however long it waited.
    assert _judge(_Usage(cpu=1.0, wait=5.0), elapsed=6.0) == "timeout"
    assert _judge(None, elapsed=6.0, exact=(1.0, 5.0)) == "timeout"
    # The cgroup's figures win over /proc's when the bootstrap joined it.
    assert _judge(sleeper, exact=(0.29, 2.10)) is None
    assert _judge(starved, exact=(0.06, 0.1)) == "timeout"


def test_exited_children_wait_is_not_blown_up_by_a_parent_with_little_cpu():
    # A parent that ran children (0.3 s of CPU) and now sleeps or deadlocks: its live processes had 5 ms of CPU and
    # 0.2 s of wake-up waits. Taken as 40 s of wait per CPU second, that made 12 s of wait for the children: the run
    # was held to the end of the grace and skipped as contention. The rate is now taken over at least 50 ms of CPU.
    sleeper = _Usage(cpu=0.305, wait=0.2, exited_cpu=0.3, live_cpu=0.005)
    assert sleeper.waited() == pytest.approx(0.2 + 0.3 * 0.2 / 0.05)
    assert _judge(sleeper, elapsed=4.0, budget=2.0) == "timeout"  # idle for more than half its 4 s: its fault
    assert _judge(sleeper, elapsed=6.0, budget=2.0, final=True) == "timeout"
    # Above 50 ms of live CPU the rate is unchanged (the 12-busy-loop figures of the test above).
    assert _Usage(cpu=0.26, wait=0.69, exited_cpu=0.21, live_cpu=0.07).waited() == pytest.approx(
        0.69 + 0.21 * 0.69 / 0.07
    )


def test_a_program_found_exited_at_a_late_check_is_scored_on_its_output():
    # A starved trainer wakes up past the limit of a program that has already exited: its output counts, no verdict.
    proc = subprocess.Popen(
        [sys.executable, "-c", "print(42)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    proc.wait()
    status_r, status_w = os.pipe()
    os.close(status_w)
    run = _Run(proc, status_r, 1 << 20)
    run.exec_started = True
    try:
        verdict = run.communicate(b"", start=time.monotonic() - 10.0, budget=1.0, grace=3.0)
    finally:
        run.close()
    assert verdict is None and run.out[1] == b"42\n"


@pytest.fixture(params=["cgroup", "proc"])
def measured(request, monkeypatch):
    """The contended sandbox with the run's accounting cgroup where this machine offers one, and without (/proc)."""
    if request.param == "proc":
        monkeypatch.setattr(code_sandbox, "_make_accounting_cgroups", lambda count: [None] * count)
    sandbox = mode_sandbox("auto", timeout_s=1.0, contention_grace=3.0)
    if request.param == "cgroup" and sandbox._acct_cgroups[0] is None:
        pytest.skip("no cgroup v2 with PSI writable here")
    return sandbox


def test_a_starved_program_working_in_children_is_never_a_wrong_answer(measured):
    reward = CodeReward(measured, timeout_per_test=1.0)
    with cpu_hogs(2):  # about 1/3 of a CPU: 0.4 s of CPU and 9 interpreter starts take ~2 s, over the 1 s limit
        results = [measured.run(IN_CHILDREN, stdin="1 2\n") for _ in range(2)]
        scores = reward([block(IN_CHILDREN)] * 2, tests=[SUM_TESTS] * 2)
    for result in results:
        assert result.status in ("ok", "sandbox_error"), result
        assert result.status == "sandbox_error" or result.stdout == "3\n"
    assert any(result.wall_s > 1.0 for result in results)  # it did need more than its limit
    assert all(score in (1.0, None) for score in scores), scores


def test_a_program_that_sleeps_after_its_children_exited_stays_a_timeout(measured):
    # Its children are done well before the limit (2 s): the time they waited must not make its sleep look starved.
    sleeper = "import subprocess, sys\nfor _ in range(4):\n    subprocess.run([sys.executable, '-S', '-c', 'pass'])\n"
    sleeper += "import time\ntime.sleep(1000)"
    with cpu_hogs(1):
        result = measured.run(sleeper, timeout_s=2.0)
    # Judged idle before the 6 s grace ran out. Not necessarily at 2 s: on a loaded machine the start-ups of the
    # program and its children really wait, and while that is half the elapsed time it is given more.
    assert result.status == "timeout" and result.wall_s < 2.0 * 3.0, result
