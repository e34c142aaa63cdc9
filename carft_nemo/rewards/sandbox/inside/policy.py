"""The inner, in-process layer: an import allow-list and an audit hook in the program's process.

It exists for clear messages ("import of 'os' is not allowed" instead of a file that is
simply not there), not for safety: a program can reach ``os`` through allowed modules or the
object graph and switch this layer off. Everything that matters is enforced by the kernel
outside the interpreter (namespaces, rlimits, seccomp). Standard library only.
"""

import builtins

# Modules a ReFT P-CoT program may import; the supervisor imports them before it forks, so a
# program's ``import fractions`` is a lookup in sys.modules.
ALLOWED_MODULES = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "datetime",
    "statistics",
    "itertools",
    "functools",
    "collections",
    "operator",
    "numbers",
    "random",
    "re",
    "string",
    "heapq",
    "bisect",
    "typing",
    "time",
    "calendar",
)
# Loaded lazily by allowed modules (datetime.strptime, locale-aware formatting).
PRELOADED = ALLOWED_MODULES + ("_strptime", "locale")

# Audit events refused outright (prefix match).
_FORBIDDEN_EVENTS = (
    "socket.",
    "subprocess.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "signal.",
    "ctypes.",
    "os.putenv",
    "os.unsetenv",
    "shutil.",
    "sys.settrace",
    "sys.setprofile",
    "sys.addaudithook",
    "mmap.",
    "fcntl.",
    "resource.setrlimit",
    "import",
)
# Events naming a path: allowed only inside the scratch folder.
_PATH_EVENTS = ("open", "os.listdir", "os.scandir", "glob.glob", "os.walk")


class SandboxViolation(PermissionError):
    """Raised in the program's process when the inner layer refuses something."""


class Policy:
    """The allow-list and the hook for one program's process (installed once, after fork)."""

    def __init__(self, scratch):
        self.scratch = scratch
        self.violations = []
        self.active = False
        self._real_import = builtins.__import__

    def _inside_scratch(self, path):
        import os

        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        if not isinstance(path, str):
            return False
        full = os.path.realpath(os.path.join(self.scratch, path))
        return full == self.scratch or full.startswith(self.scratch + os.sep)

    def _refuse(self, what):
        self.violations.append(what)
        raise SandboxViolation(f"sandbox refuses {what}")

    def audit(self, event, args):
        if not self.active:
            return
        if event.startswith(_FORBIDDEN_EVENTS):
            self._refuse(f"{event}{tuple(str(a)[:80] for a in args)!r}")
        if event in _PATH_EVENTS and not self._inside_scratch(args[0] if args else None):
            self._refuse(f"{event}({str(args[0])[:80]!r})")

    def restricted_import(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or name.split(".")[0] not in ALLOWED_MODULES:
            self._refuse(f"import of {name!r}")
        return self._real_import(name, globals, locals, fromlist, level)

    def install(self):
        import sys

        sys.addaudithook(self.audit)
        return self.restricted_import
