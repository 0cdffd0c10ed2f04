"""Start-up of one sandboxed program: namespaces, a minimal /dev, read-only mounts, limits, seccomp, then exec.

Run by `LocalSandbox` as `python -I -S _sandbox_boot.py CONFIG_JSON` (standard library only, no site-packages), with a
scrubbed environment, in a new session, its stdin/stdout/stderr being the program's. It reports on a private pipe
(`status_fd`, closed on exec so the program cannot write to it): `ACCT <cpu ns> <wait ns>` once it joined the run's
accounting cgroup (if any; every process of the run is then counted there), `PID <n>` (the host pid of the namespace's init, for a hard kill),
then `EXEC` right before the program starts, or `ERR <reason>` if the isolation could not be set up.

Isolation modes:
- `namespaces` (run as root): new mount, pid, network and IPC namespaces; a minimal /dev; every other mount re-mounted
  read-only, nodev and nosuid except the work directory; a fresh /proc; a seccomp filter (see `seccomp_filter`); then
  the program runs as an unprivileged per-slot uid with no supplementary groups.
- `userns` (run as any user): the same inside a new user namespace, the caller's uid mapped to 1000, so the program
  starts with no capabilities and cannot undo the mounts.
- `none`: resource limits, a new session and (as root) the uid drop only. `LocalSandbox` also uses it to start
  bubblewrap (`bwrap`), which then sets up the namespaces itself, and installs the same seccomp filter.

Nothing started here outlives the trainer: this process gets SIGKILL when the trainer dies (PR_SET_PDEATHSIG, checked
against the trainer's pid so that a death before the call is seen too), the namespace's init gets SIGKILL when this
process dies (checked through a pipe), and the kernel kills the rest of the pid namespace with its init.

`python _sandbox_boot.py --cleanup FD` is the trainer's clean-up watchdog (see `cleanup_after`).
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import struct
import sys
import time


CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP = 1, 38, 36, 22
SECCOMP_MODE_FILTER = 2
_FLAG_OF_OPTION = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Pseudo file systems whose sub-mounts may refuse a read-only remount (they are covered by the fresh /proc and /dev).
_TOLERATED = ("/proc", "/sys")
# The only devices a program gets: everything else (kvm, loop, fuse, disks, vsock, tun, ...) does not exist for it.
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source, target, fstype, flags, what, data=None):
    enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), what)


def _set_pdeathsig() -> None:
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


# -- seccomp -----------------------------------------------------------------------------------------------------------

# (AUDIT_ARCH, socket, io_uring_setup, has the x32 ABI) per machine.
_SYSCALLS = {"x86_64": (0xC000003E, 41, 425, True), "aarch64": (0xC00000B7, 198, 425, False)}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def seccomp_filter() -> bytes:
    """A classic-BPF seccomp program: `socket()` only for AF_INET/AF_INET6, no io_uring, no foreign syscall ABI.

    Why: the network namespace leaves only an unconfigured loopback for IP sockets, but a Unix socket file on the host
    (a daemon's control socket, possibly root-only, which a root-mapped uid would pass) is reached through the file
    system, and AF_VSOCK/AF_NETLINK/... are not all namespaced. Denying the creation of any other socket family closes
    every such path at once, whatever is mounted and whatever the uid; `socketpair()` (used by multiprocessing) stays
    allowed, since it only connects the program to itself. io_uring can create sockets without the `socket()` call, and
    32-bit (i386, x32) syscalls have other numbers, so both are refused too.

    Raises:
        OSError: on a machine this filter does not know (the sandbox mode is then reported unavailable).
    """
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {machine}")
    arch, socket_nr, io_uring_setup, x32 = _SYSCALLS[machine]
    deny = _RET_ERRNO | errno.EPERM
    prog = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 1, 0, arch), (_BPF_RET_K, 0, 0, deny), (_BPF_LD_W_ABS, 0, 0, 0)]
    if x32:
        prog += [(_BPF_JGE_K, 0, 1, 0x40000000), (_BPF_RET_K, 0, 0, deny)]
    prog += [
        (_BPF_JEQ_K, 0, 1, io_uring_setup),
        (_BPF_RET_K, 0, 0, deny),
        (_BPF_JEQ_K, 0, 4, socket_nr),  # not socket(): allow
        (_BPF_LD_W_ABS, 0, 0, 16),  # the low 32 bits of the first argument, the (int) address family
        (_BPF_JEQ_K, 2, 0, 2),  # AF_INET
        (_BPF_JEQ_K, 1, 0, 10),  # AF_INET6
        (_BPF_RET_K, 0, 0, _RET_ERRNO | errno.EAFNOSUPPORT),
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _install_seccomp() -> None:
    code = seccomp_filter()
    prog = _SockFprog(len(code) // 8, code)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp filter")


# -- mounts ------------------------------------------------------------------------------------------------------------


def _mount_points() -> list[tuple[str, int]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            flags = 0
            for option in fields[5].split(","):
                flags |= _FLAG_OF_OPTION.get(option, 0)
            points.append((point, flags))
    return points


def _minimal_dev(shm_mb: int, workdir: str) -> None:
    """Cover /dev with a read-only tmpfs holding only `DEVICES` (bind mounts of the host's), std* links and a private,
    size-capped /dev/shm. Device nodes anywhere else are unusable: every other mount gets nodev. A work directory
    under /dev (a work root in /dev/shm) gets a mount point at the same path."""
    sources = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mount /dev", "mode=755,size=64k")
    for name, fd in sources.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND, f"bind /dev/{name}")
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "0"), ("stdout", "1"), ("stderr", "2")):
        os.symlink(target if name == "fd" else f"/proc/self/fd/{target}", f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)
    options = f"mode=1777,size={max(1, shm_mb)}m"
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mount /dev/shm", options)
    if workdir.startswith("/dev/"):
        os.makedirs(workdir, exist_ok=True)
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "read-only /dev")


def _read_only_except(workdir: str, work_fd: int) -> None:
    _mount(f"/proc/self/fd/{work_fd}", workdir, None, MS_BIND | MS_REC, "bind work dir")
    inside = workdir.rstrip("/") + "/"
    for point, flags in sorted(_mount_points(), key=lambda p: len(p[0])):
        if point == "/dev" or point.startswith("/dev/"):
            continue  # the minimal /dev, set up above (the host's /dev lies hidden under it)
        if point == workdir or point.startswith(inside):
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | flags, "work dir flags")
            continue
        try:
            flags |= MS_RDONLY | MS_NOSUID | MS_NODEV
            _mount(None, point, None, MS_REMOUNT | MS_BIND | flags, f"read-only remount of {point}")
        except OSError:
            if not point.startswith(_TOLERATED):
                raise


# -- reporting, waiting ------------------------------------------------------------------------------------------------


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (message + "\n").encode())


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _parent_gone(alive_fd: int) -> bool:
    """The write end of `alive_fd` is held by the parent only: readable (EOF) once the parent has exited."""
    return bool(select.select([alive_fd], [], [], 0)[0])


def _reap_wrapper(fd: int) -> None:
    """Run the wrapper (bwrap) as a child and stay as its subreaper until every descendant is reaped.

    Orphans of the wrapper would otherwise wait for the host's init to reap them, holding the slot's pids cgroup.
    Returns only in the child, which then execs the wrapper (bwrap's --die-with-parent ties it to this process).
    """
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
    pid = os.fork()
    if pid == 0:
        _set_pdeathsig()
        return
    os.close(fd)
    # The parent's way to kill the run: SIGTERM here kills the wrapper, whose sandbox then dies with it, and this
    # process stays to reap everything (a SIGKILL of this process would leave the orphans to the host's init).
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    code = 1
    while True:
        try:
            reaped, status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(code)
        if reaped == pid:
            code = _exit_code(status)


def _join_accounting(path: str, fd: int) -> None:
    """Join the run's accounting cgroup (optional: the figures then come from /proc) and report `ACCT <cpu> <wait>`,
    this process's CPU and run-queue nanoseconds before it joined: its start-up, which a starved machine can stretch to
    a good part of a short limit, is the run's too."""
    try:
        with open("/proc/self/schedstat") as f:
            before = " ".join(f.read().split()[:2])
    except OSError:
        before = "0 0"
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
        f.flush()
        _report(fd, f"ACCT {before}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    fd, mode, workdir = cfg["status_fd"], cfg["isolation"], cfg["workdir"]
    os.set_inheritable(fd, False)
    _set_pdeathsig()
    if os.getppid() != cfg["parent"]:  # the trainer died before the call above
        os._exit(1)
    try:
        if cfg.get("cgroup"):
            # Join the slot's pids cgroup first: every process the program starts is counted against its cap.
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if cfg.get("acct_cgroup"):
            _join_accounting(cfg["acct_cgroup"], fd)
        if mode == "namespaces":
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
        elif mode == "userns":
            uid, gid = os.getuid(), os.getgid()
            flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
            _check(libc.unshare(flags), "unshare")
            for path, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
            _set_pdeathsig()  # in case the new credentials cleared it
            if os.getppid() != cfg["parent"]:
                os._exit(1)
        if mode != "none":
            _mount(None, "/", None, MS_REC | MS_PRIVATE, "make mounts private")
            seccomp_filter()  # fail here, with a clear reason, on a machine it does not know
    except OSError as exc:
        _report(fd, f"ERR {exc}")
        os._exit(1)

    alive_fd = None
    if mode != "none":
        # The first child of a new pid namespace is its init: when it exits, the kernel kills everything in it.
        alive_fd, alive_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(alive_fd)
            _report(fd, f"PID {pid}")
            os.close(fd)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    os._exit(_exit_code(status))
                except InterruptedError:
                    continue
        os.close(alive_w)
        _set_pdeathsig()
        if _parent_gone(alive_fd):
            os._exit(1)

    try:
        if mode != "none":
            work_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # reachable even if /dev hides its path
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mount /proc")
            _minimal_dev(cfg.get("shm_mb", 16), workdir)
            _read_only_except(workdir, work_fd)
            os.close(work_fd)
        limits = cfg["rlimits"]
        for name, value in limits.items():
            if value is not None:
                resource.setrlimit(
                    getattr(resource, name), tuple(value) if isinstance(value, list) else (value, value)
                )
        if cfg.get("uid") is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        if not cfg.get("wrapped"):  # a set-uid bwrap must keep its privileges; it sets no_new_privs itself
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _set_pdeathsig()  # again: a change of uid clears it
        if alive_fd is not None and _parent_gone(alive_fd):
            os._exit(1)
        if os.getppid() != cfg["parent"] and alive_fd is None:
            os._exit(1)
        if mode != "none":
            _install_seccomp()
        os.chdir(workdir)
        os.umask(0o077)
    except OSError as exc:
        _report(fd, f"ERR {exc}")
        os._exit(1)
    argv = cfg["argv"]
    if cfg.get("wrapped"):
        _reap_wrapper(fd)
        try:  # bwrap installs the same filter right before it starts the program (`--seccomp FD`)
            filter_r, filter_w = os.pipe()
            os.write(filter_w, seccomp_filter())
            os.close(filter_w)
            os.set_inheritable(filter_r, True)
        except OSError as exc:
            _report(fd, f"ERR {exc}")
            os._exit(1)
        argv = [argv[0], "--seccomp", str(filter_r), *argv[1:]]
    _report(fd, "EXEC")
    try:
        os.execve(argv[0], argv, cfg["env"])
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot start {argv[0]}: {exc}\n")
        os._exit(127)


# -- clean-up (shared with `code_sandbox`) ------------------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        # A program may have taken the permissions off its directories. O_PATH needs none on the directory itself,
        # and chmod through /proc/self/fd acts on that very inode, never on whatever a symlink would point to.
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
        finally:
            os.close(handle)
        return os.open(name, flags, dir_fd=dir_fd)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def remove_tree(path: str) -> bool:
    """Delete `path` and everything below it, at any depth, without following symlinks; never raises.

    Iterative and relative to directory descriptors (so neither the recursion limit nor PATH_MAX applies, and at most
    two directories are open at a time), climbing back with `..` and checking each parent's identity (so a tree moved
    meanwhile is left alone rather than followed). Returns whether `path` is gone.
    """
    parent, top = os.path.split(os.path.abspath(path))
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return not os.path.lexists(path)
    try:
        _remove_below(parent_fd, top)
    except OSError:
        pass
    finally:
        os.close(parent_fd)
    return not os.path.lexists(path)


def _remove_below(parent_fd: int, top: str) -> None:
    try:
        fd = _open_dir(top, parent_fd)
    except FileNotFoundError:
        return
    except OSError:
        os.unlink(top, dir_fd=parent_fd)  # not a directory (a symlink, a file)
        return
    ids, names, skip = [_identity(fd)], [top], set()
    try:
        while True:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_mode & 0o700 != 0o700:
                    os.fchmod(fd, 0o700)
            subdir, removed = None, False
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if subdir is None and (ids[-1], entry.name) not in skip:
                            subdir = entry.name
                        continue
                    with contextlib.suppress(OSError):
                        os.unlink(entry.name, dir_fd=fd)
                        removed = True
            if subdir is not None:
                try:
                    child = _open_dir(subdir, fd)
                except OSError:
                    skip.add((ids[-1], subdir))
                    continue
                os.close(fd)
                fd = child
                ids.append(_identity(fd))
                names.append(subdir)
                continue
            if removed:
                continue  # look once more: entries may have been missed while the directory changed
            if len(ids) == 1:
                os.close(fd)
                fd = -1
                os.rmdir(top, dir_fd=parent_fd)
                return
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(fd) != ids[-2]:
                return  # the tree was moved: do not follow it
            ids.pop()
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                skip.add((ids[-1], name))
    finally:
        if fd >= 0:
            os.close(fd)


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup `path`, never a process outside it.

    cgroup v2's `cgroup.kill` (Linux 5.14+) does it in the kernel, forks under way included. Elsewhere (cgroup v1, an
    older kernel) each pid read from `cgroup.procs` is signalled only through a pidfd opened before the list is read
    again and found still there: a pid signalled straight from the first list could by then belong to an unrelated
    process (its own exited and the number was reused).
    """
    try:
        fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY)  # no O_CREAT: absent outside cgroup v2
    except OSError:
        fd = None
    if fd is not None:
        try:
            os.write(fd, b"1")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    pidfds = {}
    try:
        for pid in cgroup_pids(path):
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:  # Linux < 5.3: no race-free way to signal, only the plain kill
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        for pid in cgroup_pids(path):
            if pid in pidfds:  # the pidfd holds that process: still in the group, so that one is a member
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfds[pid], signal.SIGKILL)
    finally:
        for fd in pidfds.values():
            os.close(fd)


def remove_cgroup(path: str, wait_s: float = 5.0) -> bool:
    """SIGKILL whatever is left in a cgroup (see `kill_cgroup`), wait for it to empty, remove it. Returns whether it is
    gone."""
    deadline = time.monotonic() + wait_s
    while os.path.isdir(path):
        kill_cgroup(path)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
    return True


def lock_is_free(path: str) -> bool:
    """Whether nobody holds the flock of the directory `path` (whose owner holds it for as long as it lives)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cleanup_after(fd: int) -> None:
    """The trainer's clean-up watchdog: read `dir PATH` / `cgroup PATH` lines from `fd` until EOF, which comes when
    the trainer has exited (however: SIGKILL included), then remove those cgroups (killing what is left in them) and
    those directories, and exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    dirs, cgroups, buffer = [], [], b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            kind, _, path = line.decode(errors="replace").partition(" ")
            (cgroups if kind == "cgroup" else dirs).append(path)
    for path in cgroups:
        remove_cgroup(path)
    for path in dirs:
        remove_tree(path)


if __name__ == "__main__":
    if sys.argv[1] == "--cleanup":
        cleanup_after(int(sys.argv[2]))
    else:
        main()
