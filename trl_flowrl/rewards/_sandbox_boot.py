"""Start-up of one sandboxed program: namespaces, read-only mounts, resource limits, privilege drop, then exec.

Run by `LocalSandbox` as `python -I -S _sandbox_boot.py CONFIG_JSON` (standard library only, no site-packages), with a
scrubbed environment, in a new session, its stdin/stdout/stderr being the program's. It reports on a private pipe
(`status_fd`, closed on exec so the program cannot write to it): `PID <n>` (the host pid of the namespace's init, for a
hard kill), then `EXEC` right before the program starts, or `ERR <reason>` if the isolation could not be set up.

Isolation modes:
- `namespaces` (run as root): new mount, pid and network namespaces; every mount re-mounted read-only except the
  work directory; a fresh /proc; then the program runs as an unprivileged per-slot uid with no supplementary groups.
- `userns` (run as any user): the same inside a new user namespace, the caller's uid mapped to 1000, so the program
  starts with no capabilities and cannot undo the read-only mounts.
- `none`: resource limits, a new session and (as root) the uid drop only. `LocalSandbox` also uses it to start
  bubblewrap (`bwrap`), which then sets up the namespaces itself.
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys


CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
_FLAG_OF_OPTION = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Pseudo file systems whose sub-mounts may refuse a read-only remount; the program cannot write there as non-root.
_TOLERATED = ("/proc", "/sys", "/dev")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, what):
    enc = [None if x is None else x.encode() for x in (source, target, fstype)]
    _check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), None), what)


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


def _read_only_except(workdir: str) -> None:
    _mount(workdir, workdir, None, MS_BIND | MS_REC, "bind work dir")
    for point, flags in sorted(_mount_points(), key=lambda p: len(p[0])):
        if point == workdir or point.startswith(workdir.rstrip("/") + "/"):
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, f"read-only remount of {point}")
        except OSError:
            if not point.startswith(_TOLERATED):
                raise


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (message + "\n").encode())


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _reap_wrapper(fd: int, cfg: dict) -> None:
    """Run the wrapper (bwrap) as a child and stay as its subreaper until every descendant is reaped.

    Orphans of the wrapper would otherwise wait for the host's init to reap them, holding the slot's pids cgroup.
    Returns only in the child, which then execs the wrapper.
    """
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
    pid = os.fork()
    if pid == 0:
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


def main() -> None:
    cfg = json.loads(sys.argv[1])
    fd, mode, workdir = cfg["status_fd"], cfg["isolation"], cfg["workdir"]
    os.set_inheritable(fd, False)
    try:
        if cfg.get("cgroup"):
            # Join the slot's pids cgroup first: every process the program starts is counted against its cap.
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if mode == "namespaces":
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
        elif mode == "userns":
            uid, gid = os.getuid(), os.getgid()
            _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
            for path, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
        if mode != "none":
            _mount(None, "/", None, MS_REC | MS_PRIVATE, "make mounts private")
    except OSError as exc:
        _report(fd, f"ERR {exc}")
        os._exit(1)

    if mode != "none":
        # The first child of a new pid namespace is its init: when it exits, the kernel kills everything in it.
        pid = os.fork()
        if pid:
            _report(fd, f"PID {pid}")
            os.close(fd)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    os._exit(_exit_code(status))
                except InterruptedError:
                    continue

    try:
        if mode != "none":
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mount /proc")
            _read_only_except(workdir)
        limits = cfg["rlimits"]
        for name, value in limits.items():
            if value is not None:
                resource.setrlimit(getattr(resource, name), (value, value))
        if cfg.get("uid") is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        if not cfg.get("wrapped"):  # a set-uid bwrap must keep its privileges; it sets no_new_privs itself
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        os.chdir(workdir)
        os.umask(0o077)
    except OSError as exc:
        _report(fd, f"ERR {exc}")
        os._exit(1)
    if cfg.get("wrapped"):
        _reap_wrapper(fd, cfg)
    _report(fd, "EXEC")
    argv = cfg["argv"]
    try:
        os.execve(argv[0], argv, cfg["env"])
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot start {argv[0]}: {exc}\n")
        os._exit(127)


if __name__ == "__main__":
    main()
