"""Child side of the program sandbox: run one ``solution()`` and report one JSON line.

Started by :mod:`carft_nemo.rewards.sandbox` as ``python -I -S -B <this file> <limits-json>``
with an empty environment, its own session (process group), cwd = a fresh scratch folder,
and the program on stdin. Standard library only, on purpose: with ``-S`` no site-packages
are importable, and nothing of the parent package is loaded into the child.

Order matters: pre-import the allowed modules (their files are read before the file
policy starts), cut the network namespace if the kernel lets us, lower rlimits, install
the audit hook, then ``exec`` the program with a restricted ``__import__``. Program
output goes to a bounded in-memory buffer; the real stdout carries only the final line.
"""

import builtins
import io
import json
import os
import resource
import sys

# Modules a ReFT P-CoT program may import. Everything is imported *now*, before the file
# policy is active, so a program's ``import fractions`` is a sys.modules lookup.
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
# Lazily imported by allowed modules (datetime.strptime, locale-aware formatting); loaded
# now because the policy refuses new imports once the program runs.
_PRELOADED = ALLOWED_MODULES + ("_strptime", "locale")
for _name in _PRELOADED:
    __import__(_name)

# Audit events that are refused outright (prefix match). Sockets, process creation,
# signals to other processes, native code, filesystem mutation, tracing hooks.
FORBIDDEN_EVENT_PREFIXES = (
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
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.chdir",
    "os.chroot",
    "os.setxattr",
    "os.removexattr",
    "os.utime",
    "shutil.",
    "sys.settrace",
    "sys.setprofile",
    "sys.addaudithook",
    "sys.remote_exec",
    "mmap.",
    "winreg.",
    "webbrowser.",
    "urllib.",
    "http.",
    "ftplib.",
    "smtplib.",
    "telnetlib.",
    "pty.",
    "fcntl.",
    "resource.setrlimit",
    "pdb.",
    "cpython.run_",
    "code.__new__",
    "function.__new__",
    "import",
)
# Events that name a path: allowed only inside the scratch folder.
PATH_EVENTS = ("open", "os.listdir", "os.scandir", "glob.glob", "os.walk")


class SandboxViolation(PermissionError):
    """Raised inside the child when the program touches something the policy refuses."""


class OutputLimitExceeded(Exception):
    """Raised inside the child when the program prints more than the output limit."""


class BoundedWriter(io.TextIOBase):
    """A text sink that keeps at most ``limit`` characters and raises past it."""

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.size = 0

    def writable(self):
        return True

    def write(self, text):
        self.size += len(text)
        if self.size > self.limit:
            raise OutputLimitExceeded(f"output over {self.limit} characters")
        self.parts.append(text)
        return len(text)

    def getvalue(self):
        return "".join(self.parts)


READY = "\x06\n"  # start-up done marker (before any program code runs)

STATE = {"violations": [], "scratch": "", "active": False}


def _inside_scratch(path):
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    if not isinstance(path, str):  # integer fds and the like: programs never need them
        return False
    full = os.path.realpath(os.path.join(STATE["scratch"], path))
    return full == STATE["scratch"] or full.startswith(STATE["scratch"] + os.sep)


def _audit(event, args):
    # Why an audit hook: it sees operations however they are reached (an allowed module,
    # object-graph tricks to reach ``os``), not only names the program imports.
    if not STATE["active"]:
        return
    refused = event.startswith(FORBIDDEN_EVENT_PREFIXES)
    if not refused and event in PATH_EVENTS:
        refused = not _inside_scratch(args[0] if args else None)
    if refused:
        # Remember it: the program may catch the exception, the verdict stays FORBIDDEN.
        STATE["violations"].append(f"{event}{tuple(str(a)[:80] for a in args)!r}")
        raise SandboxViolation(f"sandbox refuses {event}")


def _restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
    root = name.split(".")[0]
    if level != 0 or root not in ALLOWED_MODULES:
        STATE["violations"].append(f"import {name}")
        raise SandboxViolation(f"import of {name!r} is not allowed")
    return _REAL_IMPORT(name, globals, locals, fromlist, level)


_REAL_IMPORT = builtins.__import__


def _unshare_network():
    """Move into fresh user+network namespaces (no interfaces but a down loopback).

    Best effort: needs unprivileged user namespaces or root; returns whether it worked.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newuser, clone_newnet = 0x10000000, 0x40000000
        return libc.unshare(clone_newuser | clone_newnet) == 0 or libc.unshare(clone_newnet) == 0
    except Exception:  # noqa: BLE001 - no ctypes / no libc symbol: other layers still hold
        return False


def _set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["cpu_time_s"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    # No effect for root (CAP_SYS_RESOURCE), hence the audit hook on os.fork as well.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _to_report(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numbers

            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                value = float(value)  # Fraction, Decimal
            else:
                return {"status": "NOT_A_NUMBER" if value is not None else "NO_RESULT", "repr": repr(value)[:200]}
        except Exception as err:  # noqa: BLE001 - odd __float__ implementations
            return {"status": "NOT_A_NUMBER", "repr": f"<unconvertible: {type(err).__name__}>"}
    try:
        value = float(value)
    except OverflowError:
        return {"status": "NOT_A_NUMBER", "repr": "<int too large for float>"}
    if value != value or value in (float("inf"), float("-inf")):
        return {"status": "NOT_A_NUMBER", "repr": repr(value)}
    return {"status": "OK", "value": value}


def _run(source, entry, output, importer):
    glb = {"__name__": "__sandbox__", "__builtins__": dict(vars(builtins), __import__=importer)}
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as err:
        return {"status": "SYNTAX_ERROR", "error": f"{type(err).__name__}: {err}"}
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output
    STATE["active"] = True
    try:
        exec(code, glb)  # noqa: S102 - this is the sandboxed execution
        fn = glb.get(entry)
        if not callable(fn):
            return {"status": "NO_RESULT", "error": f"no callable {entry}()"}
        report = _to_report(fn())
    except OutputLimitExceeded as err:
        report = {"status": "OUTPUT_TOO_LARGE", "error": str(err)}
    except MemoryError:
        report = {"status": "MEMORY", "error": "MemoryError"}
    except BaseException as err:  # noqa: BLE001 - any failure of model-written code
        report = {"status": "EXCEPTION", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        STATE["active"] = False
        sys.stdout, sys.stderr = old_out, old_err
    if STATE["violations"]:
        report = {"status": "FORBIDDEN", "error": "; ".join(STATE["violations"][:5])}
    return report


def main():
    limits = json.loads(sys.argv[1])
    STATE["scratch"] = os.path.realpath(os.getcwd())
    source = sys.stdin.read()
    netns = _unshare_network() if limits["unshare_network"] else False
    _set_limits(limits)
    importer = _REAL_IMPORT
    if limits["enforce_policy"]:  # off only in tests of the lower layers (rlimits, killpg)
        sys.addaudithook(_audit)
        importer = _restricted_import
    output = BoundedWriter(limits["max_output_chars"])
    # Tell the parent start-up is over: its wall-clock deadline for the program starts now.
    sys.__stdout__.write(READY)
    sys.__stdout__.flush()
    report = _run(source, limits["entry"], output, importer)
    report["stdout"] = output.getvalue()[-limits["max_output_chars"] :]
    report["netns"] = netns
    sys.__stdout__.write("\n" + json.dumps(report) + "\n")
    sys.__stdout__.flush()


if __name__ == "__main__":
    main()
