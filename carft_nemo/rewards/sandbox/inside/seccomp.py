"""The system-call filter of a program's process: a classic-BPF seccomp program built with ctypes.

A denylist of calls a pure-arithmetic program never makes and an escape needs: tracing and
reading other processes' memory, namespaces and mounts, kernel modules and kexec, BPF,
keyrings, perf, io_uring, handles to host files, executing another binary, and sockets (the
network namespace is empty anyway; a socket is the first step of every exfiltration).
A denied call kills the whole process (``SECCOMP_RET_KILL_PROCESS``): the supervisor sees
SIGSYS, a verdict the kernel gave, not one the program wrote. ``clone`` is allowed only
without namespace flags; ``clone3`` (whose flags a BPF filter cannot read) fails with ENOSYS so
the C library falls back to ``clone``. Standard library only: this runs inside the sandbox.
"""

import ctypes
import platform

# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low word first, little-endian).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_ENOSYS = 38
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_NAMESPACE_FLAGS = 0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

_DENIED_NAMES = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "personality",
    "execve", "execveat", "socket", "socketpair",
)  # fmt: skip

# Per architecture: AUDIT_ARCH value and system-call numbers (x86_64: arch/x86/entry/syscalls/
# syscall_64.tbl; aarch64: the generic table include/uapi/asm-generic/unistd.h).
_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
            "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
            "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
            "mount_setattr": 442, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
            "finit_module": 313, "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
            "quotactl": 179, "syslog": 103, "vhangup": 153, "bpf": 321, "perf_event_open": 298,
            "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "open_by_handle_at": 304, "name_to_handle_at": 303,
            "fanotify_init": 300, "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305,
            "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "personality": 135, "execve": 59,
            "execveat": 322, "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
            "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
            "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
            "mount_setattr": 442, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
            "finit_module": 273, "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
            "quotactl": 60, "syslog": 116, "vhangup": 58, "bpf": 280, "perf_event_open": 241,
            "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "open_by_handle_at": 265, "name_to_handle_at": 264,
            "fanotify_init": 262, "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266,
            "adjtimex": 171, "sethostname": 161, "setdomainname": 162, "personality": 92, "execve": 221,
            "execveat": 281, "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435,
        },
    ),
}  # fmt: skip


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def build(machine=None):
    """The filter as (code, jt, jf, k) tuples, or None on an architecture without a table."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch
    denied = [numbers[name] for name in _DENIED_NAMES]
    insns = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, audit_arch), (_RET_K, 0, 0, RET_KILL_PROCESS), (_LD_W_ABS, 0, 0, 0)]
    if audit_arch == 0xC000003E:  # x32 system calls share the x86_64 arch value, numbers from 0x40000000
        insns.append((_JGE_K, 0, 1, 0x40000000))
        insns.append((_RET_K, 0, 0, RET_KILL_PROCESS))
    insns.append((_JEQ_K, 0, 1, numbers["clone3"]))
    insns.append((_RET_K, 0, 0, _RET_ERRNO | _ENOSYS))
    insns.append((_JEQ_K, 0, 3, numbers["clone"]))
    insns.append((_LD_W_ABS, 0, 0, 16))  # clone's flags (low word)
    insns.append((_JSET_K, len(denied) + 2, 0, _NAMESPACE_FLAGS))  # to the kill at the end
    insns.append((_RET_K, 0, 0, RET_ALLOW))
    for i, nr in enumerate(denied):
        insns.append((_JEQ_K, len(denied) - i, 0, nr))
    insns.append((_RET_K, 0, 0, RET_ALLOW))
    insns.append((_RET_K, 0, 0, RET_KILL_PROCESS))
    return insns


class Filter:
    """A filter prepared once (in the supervisor) and installed in each program's process."""

    def __init__(self, insns):
        self._insns = (_Insn * len(insns))(*[_Insn(*i) for i in insns])
        self._prog = _Prog(len(insns), self._insns)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self):
        """no_new_privs, then the filter; raises OSError when the kernel refuses."""
        prctl = self._libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
