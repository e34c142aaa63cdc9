"""Enter the sandbox with the kernel's namespaces directly (where bubblewrap is not used).

Runs in the process the trainer started, before any program. ``enter`` creates new user,
mount, PID, network, IPC and UTS namespaces, maps root inside to an unprivileged uid
outside (65534 when the trainer is root: a helper forked *before* the unshare writes the
maps, as only a process with CAP_SETUID outside may map another uid; the caller's own uid
otherwise), forks the namespace's PID 1 (which returns from ``enter``; the process the
trainer started stays outside as a waiter that dies with the trainer and takes PID 1 with
it), builds a new root from read-only binds of what the interpreter needs plus a private
tmpfs ``/tmp``, a fresh ``/proc`` and four device nodes, and pivots into it. The host's
files, ``/tmp``, home, other processes and network are then simply not there.
Standard library only.
"""

import ctypes
import os
import platform
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
ALL = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
# statvfs flags of a mount that a bind-remount inside a user namespace must keep (the kernel
# locks them), mapped to mount flags.
_LOCKED = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)
DEVICES = ("null", "zero", "urandom", "random")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")


def die_with_parent():
    """SIGKILL this process when the process (thread) that started it exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare_mapped(outside_uid, outside_gid, paths):
    """unshare(ALL) and map uid/gid 0 inside to ``outside_uid``/``outside_gid``.

    Returns an O_PATH descriptor for each of ``paths``, opened in the new mount namespace
    (a bind mount's source must be in the caller's namespace) with the trainer's ids, before
    they are given up: the namespace's root (uid 65534 outside for a root trainer) may not be
    able to walk to them (a pyenv interpreter under a 0700 /root).
    """
    if outside_uid == os.geteuid():
        _check(_libc.unshare(ALL), "unshare(user, mount, pid, net, ipc, uts)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {outside_uid} 1\n")
        _write("/proc/self/gid_map", f"0 {outside_gid} 1\n")
        return [os.open(p, os.O_PATH) for p in paths]
    # Another uid outside: only a process with CAP_SETUID in the parent namespace may write
    # that map, so a helper forked before the unshare writes it for us.
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(go_w)
            os.close(done_r)
            if os.read(go_r, 1) == b"1":
                _write(f"/proc/{me}/setgroups", "deny")
                _write(f"/proc/{me}/uid_map", f"0 {outside_uid} 1\n")
                _write(f"/proc/{me}/gid_map", f"0 {outside_gid} 1\n")
                code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(done_w)
    os.setgroups([])  # the trainer's supplementary groups would stay valid outside
    rc = _libc.unshare(ALL)
    err = ctypes.get_errno()
    os.write(go_w, b"1" if rc == 0 else b"0")
    os.close(go_w)
    _, status = os.waitpid(helper, 0)
    os.close(done_r)
    if rc != 0:
        raise OSError(err, f"unshare(user, mount, pid, net, ipc, uts): {os.strerror(err)}")
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(1, f"could not map uid 0 inside the sandbox to uid {outside_uid} outside")
    fds = [os.open(p, os.O_PATH) for p in paths]
    # Our own ids are still the trainer's (unmapped here): become the namespace's root, which
    # is outside_uid outside.
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    return fds


def _mountpoint_for_new_root(sources):
    for candidate in ("/tmp", "/mnt", "/var/tmp", "/opt", "/srv"):
        if os.path.isdir(candidate) and not any(
            s == candidate or s.startswith(candidate.rstrip("/") + "/") for s in sources
        ):
            return candidate
    raise OSError(2, "no directory to build the sandbox's root on (tried /tmp, /mnt, /var/tmp, /opt, /srv)")


def _bind_read_only(source, target):
    _mount(source, target, None, MS_BIND | MS_REC)
    locked = os.statvfs(target).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for st_flag, ms_flag in _LOCKED:
        if locked & st_flag:
            flags |= ms_flag
    _mount(None, target, None, flags)


def _build_root(spec, sources):
    """Mount the sandbox's file system under a fresh tmpfs and pivot into it.

    ``sources``: an O_PATH descriptor per bind (``_unshare_mapped``).
    """
    binds = spec["binds"]  # [[host path, path inside], ...]; read-only
    symlinks = spec["symlinks"]  # [[link path, target], ...]
    new_root = _mountpoint_for_new_root([src for src, _ in binds])
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for (_, dst), fd in zip(binds, sources):
        target = new_root + dst
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _bind_read_only(f"/proc/self/fd/{fd}", target)
        os.close(fd)
    for link, target in symlinks:
        os.makedirs(os.path.dirname(new_root + link), exist_ok=True)
        os.symlink(target, new_root + link)
    os.makedirs(new_root + "/dev")
    for name in DEVICES:
        open(f"{new_root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{new_root}/dev/{name}", None, MS_BIND)
    os.makedirs(new_root + "/proc")
    _mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(new_root + "/tmp")
    _mount("tmpfs", new_root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={spec['scratch_mb']}m")
    os.chdir(new_root)
    os.makedirs(".old")
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(95, f"pivot_root: no system-call number for {platform.machine()}")
    _check(_libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount2(/.old)")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    os.chdir("/tmp")


def enter(spec):
    """Enter the sandbox; returns in its PID 1. The caller's own process never returns."""
    trainer = os.getppid()
    sources = _unshare_mapped(spec["outside_uid"], spec["outside_gid"], [src for src, _ in spec["binds"]])
    die_with_parent()  # after the uid change, which clears the parent-death signal
    if os.getppid() != trainer:  # the trainer died before the line above
        os._exit(1)
    alive_r, alive_w = os.pipe()  # EOF on alive_r: the waiter is gone
    pid1 = os.fork()
    if pid1:
        os.close(alive_r)
        # The waiter, outside the new PID namespace: keep no pipe to the trainer open, so the
        # trainer sees the sandbox end as soon as its PID 1 does.
        for fd in (0, 1):
            os.close(fd)
        _, status = os.waitpid(pid1, 0)
        os._exit(min(255, abs(os.waitstatus_to_exitcode(status))))
    die_with_parent()  # our parent is the waiter; it dies with the trainer
    os.close(alive_w)
    import select

    if select.select([alive_r], [], [], 0)[0]:  # the waiter died before the line above
        os._exit(1)
    os.close(alive_r)
    _build_root(spec, sources)
