"""The supervisor: a pre-started interpreter inside the sandbox that runs programs one by one.

Started by :mod:`carft_nemo.rewards.sandbox.pool` as ``python -I -S -B supervisor.py SPEC``,
inside bubblewrap, or outside and then entering namespaces itself (``namespaces.py``), or,
in the opt-in weak mode, with no boundary. It imports the modules programs may use, says it
is ready, then for each request (a length-prefixed JSON frame on stdin) forks a process for
the program and answers with one frame on stdout.

Why a fork per program: a fresh address space and fresh limits for each program at the cost
of a fork, not an interpreter start. The program's process gets its limits, no capabilities,
no_new_privs and the seccomp filter before any program code runs; its stdin is /dev/null,
its stdout/stderr a pipe this supervisor reads (and cuts at the output limit), and its only
other descriptor (3) a pipe for its answer. The supervisor's own pipes to the trainer are
closed in that process, and the supervisor is not dumpable (no ptrace, /proc/<pid>/mem or
/proc/<pid>/fd for anyone without capabilities), so a program cannot write the
supervisor's frames or reach into it. In the namespace modes the supervisor is the PID
namespace's init: signals from inside cannot kill it, and after every program it kills every
other process in the namespace (``kill(-1, SIGKILL)``) and empties the scratch tmpfs.

The verdict is the supervisor's: TIMEOUT (its deadline, or SIGXCPU), FORBIDDEN on SIGSYS
(the seccomp filter), KILLED on other signals, OUTPUT_TOO_LARGE at the output cap,
NO_RESULT for an exit without a well-formed answer. Only when the program's process exits
normally is its answer frame read, and from it only a failure status or OK with a finite
number is taken. Standard library only.
"""

import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import namespaces  # noqa: E402
import policy  # noqa: E402
import seccomp  # noqa: E402
from frames import read_frame, write_frame  # noqa: E402

for _name in policy.PRELOADED:
    __import__(_name)

MAX_ANSWER = 256 * 1024
ANSWER_FD = 3
SETUP_FAILED = 70  # exit code of a program's process whose sandbox set-up failed
SELF_REPORTED = ("OK", "EXCEPTION", "SYNTAX_ERROR", "NO_RESULT", "NOT_A_NUMBER", "MEMORY", "FORBIDDEN")
_CAP_VERSION_3 = 0x20080522
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_SECUREBITS_LOCKED_NOROOT = 0x2F  # NOROOT, NO_SETUID_FIXUP, each locked; KEEP_CAPS locked off


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def drop_capabilities():
    """Leave the program's process with no capabilities, now or after any exec; raise if any remain."""
    for cap in range(64):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails without CAP_SETPCAP: then there is nothing to drop
    _libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED_NOROOT, 0, 0, 0)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    _libc.capset(ctypes.byref(header), data)
    _libc.capget(ctypes.byref(header), data)
    if any(d.effective or d.permitted or d.inheritable for d in data):
        raise OSError(1, "capabilities remain after capset")


def set_limits(limits):
    mb = 1024 * 1024
    cpu = int(limits["cpu_time_s"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))


def to_answer(value):
    """The program's return value as an answer frame (OK with a finite float, or why not)."""
    if value is None:
        return {"status": "NO_RESULT", "error": "solution() returned None"}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        import numbers

        try:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                return {"status": "NOT_A_NUMBER", "error": repr(value)[:200]}
            value = float(value)  # Fraction, Decimal
        except Exception as err:  # noqa: BLE001 - odd __float__ implementations
            return {"status": "NOT_A_NUMBER", "error": f"<unconvertible: {type(err).__name__}>"}
    try:
        value = float(value)
    except OverflowError:
        return {"status": "NOT_A_NUMBER", "error": "<int too large for float>"}
    if value != value or value in (float("inf"), float("-inf")):
        return {"status": "NOT_A_NUMBER", "error": repr(value)}
    return {"status": "OK", "value": value}


def run_in_child(source, limits, scratch, seccomp_filter, own_group):
    """The program's process, after fork: confine, run, write the answer to fd 3, exit."""
    try:
        namespaces.die_with_parent()  # the supervisor's death ends its programs in every mode
        if own_group:
            os.setpgid(0, 0)
        os.chdir(scratch)
        set_limits(limits)
        drop_capabilities()  # the supervisor is root in its user namespace (or the trainer's uid, weak mode)
        if seccomp_filter is not None:
            seccomp_filter.install()
        importer = policy.Policy(scratch) if limits["inner_policy"] else None
        restricted = importer.install() if importer else None
    except BaseException as err:  # noqa: BLE001 - never run a program half-confined
        try:
            os.write(2, f"sandbox set-up failed: {type(err).__name__}: {err}\n".encode())
        finally:
            os._exit(SETUP_FAILED)
    answer = _run(source, limits["entry"], importer, restricted)
    if importer is not None and importer.violations:
        answer = {"status": "FORBIDDEN", "error": "inner policy: " + "; ".join(importer.violations[:5])}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - output lost: the answer still counts
            pass
    try:
        os.write(ANSWER_FD, json.dumps(answer).encode()[:MAX_ANSWER])
    finally:
        os._exit(0)


def _run(source, entry, importer, restricted):
    import builtins

    namespace = {"__name__": "__sandbox__", "__builtins__": dict(vars(builtins))}
    if restricted is not None:
        namespace["__builtins__"]["__import__"] = restricted
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError) as err:
        return {"status": "SYNTAX_ERROR", "error": f"{type(err).__name__}: {err}"}
    if importer is not None:
        importer.active = True
    try:
        exec(code, namespace)  # noqa: S102 - this is the sandboxed execution
        fn = namespace.get(entry)
        if not callable(fn):
            return {"status": "NO_RESULT", "error": f"no callable {entry}()"}
        return to_answer(fn())
    except MemoryError:
        return {"status": "MEMORY", "error": "MemoryError (RLIMIT_AS)"}
    except BaseException as err:  # noqa: BLE001 - any failure of model-written code
        return {"status": "EXCEPTION", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        if importer is not None:
            importer.active = False


def _collect(pid, out_r, ans_r, deadline, max_output):
    """Read the program's output and answer until its process exits, the deadline, or the output cap.

    The process's exit ends the wait, not the pipes' EOF: a grandchild may hold them open
    (the sweep kills it next). What is in the pipes at the exit is read.
    """
    output, answer, reason = bytearray(), bytearray(), None
    exited = os.pidfd_open(pid)
    with selectors.DefaultSelector() as sel:
        sel.register(out_r, selectors.EVENT_READ)
        sel.register(ans_r, selectors.EVENT_READ)
        sel.register(exited, selectors.EVENT_READ)
        while reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            events = sel.select(remaining)
            done = any(key.fd == exited for key, _ in events)
            for fd in (out_r, ans_r) if done else [key.fd for key, _ in events]:
                if fd not in sel.get_map():
                    continue
                os.set_blocking(fd, False)
                try:
                    data = os.read(fd, 1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                elif fd == out_r:
                    output += data
                    if len(output) > max_output:
                        reason = "output"
                else:
                    answer += data
                    if len(answer) > MAX_ANSWER:
                        answer = bytearray(b"-")  # not an answer: NO_RESULT below
                        sel.unregister(fd)
            if done:
                break
    os.close(exited)
    if reason is not None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, bytes(output), bytes(answer), reason


def verdict(status, answer, reason, max_output):
    """The program's status from what the kernel and this supervisor observed."""
    if reason == "timeout":
        return {"status": "TIMEOUT", "error": "wall-clock deadline"}
    if reason == "output":
        return {"status": "OUTPUT_TOO_LARGE", "error": f"wrote more than {max_output} bytes"}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return {"status": "TIMEOUT", "error": "RLIMIT_CPU"}
        if sig == signal.SIGSYS:
            return {"status": "FORBIDDEN", "error": "a system call the seccomp filter refuses (SIGSYS)"}
        return {"status": "KILLED", "error": f"signal {signal.Signals(sig).name}"}
    code = os.WEXITSTATUS(status)
    if code == SETUP_FAILED:
        return {"status": "KILLED", "error": "the sandbox set-up of the program's process failed"}
    if code != 0:
        return {"status": "NO_RESULT", "error": f"exit code {code} without an answer"}
    try:
        claimed = json.loads(answer.decode())
    except (UnicodeDecodeError, ValueError):
        claimed = None
    if not isinstance(claimed, dict) or claimed.get("status") not in SELF_REPORTED:
        return {"status": "NO_RESULT", "error": "exited without an answer"}
    if claimed["status"] == "OK":
        value = claimed.get("value")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or abs(value) == float("inf")
        ):
            return {"status": "NOT_A_NUMBER", "error": "answer is not a finite number"}
        return {"status": "OK", "value": float(value)}
    return {"status": claimed["status"], "error": str(claimed.get("error", ""))[:500]}


def sweep(child_pgid):
    """Kill everything the program left behind; reap it."""
    if os.getpid() == 1:  # namespace init: every other process in the namespace is the program's
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass  # nobody left to kill; reap what has died
            try:
                while os.waitpid(-1, 0):
                    pass
            except ChildProcessError:
                return
    try:
        os.killpg(child_pgid, signal.SIGKILL)  # weak mode: a setsid() escapes this (documented)
    except (ProcessLookupError, PermissionError):
        pass


def clear_scratch(scratch):
    for entry in os.listdir(scratch):
        path = os.path.join(scratch, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def run_one(source, limits, scratch, seccomp_filter, weak):
    started = time.monotonic()
    out_r, out_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(ans_r)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(ans_w, ANSWER_FD)
        os.closerange(ANSWER_FD + 1, 1 << 16)  # the supervisor's pipes to the trainer included
        run_in_child(source, limits, scratch, seccomp_filter, own_group=weak)
    os.close(out_w)
    os.close(ans_w)
    try:
        status, output, answer, reason = _collect(
            pid, out_r, ans_r, started + limits["timeout_s"], limits["max_output_chars"]
        )
    finally:
        os.close(out_r)
        os.close(ans_r)
        sweep(pid)
        clear_scratch(scratch)
    result = verdict(status, answer, reason, limits["max_output_chars"])
    result["stdout"] = output[-limits["max_output_chars"] :].decode("utf-8", "replace")
    result["duration_s"] = time.monotonic() - started
    return result


def main():
    spec = json.loads(sys.argv[1])
    if spec["mode"] == "namespaces":
        namespaces.enter(spec)
    elif spec["mode"] == "process":
        namespaces.die_with_parent()  # bubblewrap's --die-with-parent and enter() do this in the other modes
    scratch = spec["scratch"]
    weak = spec["mode"] == "process"
    limits = spec["limits"]
    seccomp_filter, seccomp_note = None, "off"
    if limits["seccomp"]:
        insns = seccomp.build()
        if insns is None:
            seccomp_note = "no system-call table for this architecture"
        else:
            seccomp_filter, seccomp_note = seccomp.Filter(insns), "on"
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    # The trainer's frames: the only copies of these descriptors outside run in the child are closed there.
    requests, replies = 0, 1
    write_frame(replies, {"ready": True, "pid": os.getpid(), "seccomp": seccomp_note})
    while True:
        request = read_frame(requests)
        if request is None:
            return
        write_frame(replies, run_one(request["source"], limits, scratch, seccomp_filter, weak))


if __name__ == "__main__":
    main()
