"""Adversarial programs against the operating-system boundary of the sandbox.

Most cases run with the inner, in-process layer switched off (``inner_policy=False``), so
what they check is the kernel's boundary alone: every case ends in its typed failure or in
an answer that carries nothing from outside; nothing is written outside the sandbox; the
secret (a file and an environment variable of the trainer) never comes back; no process is
left after a program; the trainer survives."""

import os
import time
from pathlib import Path

import psutil
import pytest

from carft_nemo.rewards.sandbox import SandboxConfig, SandboxPool, SandboxStatus

S = SandboxStatus
SECRET = "carft-test-secret-9f3a"
# Three ways to reach ``os`` without writing a forbidden import.
OS_BY_SUBCLASSES = (
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__"
)
OS_BY_MODULE_ATTRIBUTE = "__import__('random')._os.__dict__"
OS_BY_FRAMES = "(lambda f: f.f_globals['__builtins__']['__import__']('random')._os.__dict__)(sys._getframe())"
OS = OS_BY_SUBCLASSES


def prog(body: str, header: str = "") -> str:
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return f"{header}\ndef solution():\n{lines}\n"


def limits(**overrides) -> SandboxConfig:
    base = dict(timeout_s=1.5, cpu_time_s=1, memory_mb=256, max_output_chars=4096, max_file_bytes=64 * 1024)
    return SandboxConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer") / "secret.txt"
    path.write_text(SECRET)
    return path


@pytest.fixture(scope="module")
def boundary():
    """The kernel's boundary alone: no in-process layer."""
    os.environ["CARFT_SECRET"] = SECRET  # inherited by nothing: sandboxes start with an empty environment
    pool = SandboxPool(limits(inner_policy=False))
    yield pool
    pool.close()
    del os.environ["CARFT_SECRET"]


@pytest.fixture(scope="module")
def layered():
    pool = SandboxPool(limits())
    yield pool
    pool.close()


def leftovers(pool: SandboxPool) -> list[str]:
    """Processes under the sandboxes' supervisors: after a program there must be none."""
    found = []
    for slot in list(pool._slots.queue):
        if slot.proc is None:
            continue
        try:
            for supervisor in psutil.Process(slot.proc.pid).children():
                found += [f"{p.pid} {p.name()} {p.status()}" for p in supervisor.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def run(pool: SandboxPool, source: str):
    result = pool.run([source])[0]
    assert leftovers(pool) == [], "processes left after the program"
    assert result.duration_s < pool.config.timeout_s + 10.0
    assert SECRET not in result.stdout + result.error
    return result


KERNEL_CASES = [
    ("infinite_loop", prog("while True:\n    pass"), {S.TIMEOUT}),
    ("sleep_forever", prog("time.sleep(3600)", "import time"), {S.TIMEOUT}),
    ("memory_bytearray", prog("a = bytearray(8 * 1024 ** 3)\nreturn 1"), {S.MEMORY}),
    ("memory_growing_list", prog("a = []\nwhile True:\n    a.append('x' * 10 ** 6)"), {S.MEMORY}),
    ("print_loop", prog("while True:\n    print('y' * 1000)"), {S.OUTPUT_TOO_LARGE}),
    ("raw_fd_write", prog(f"g = {OS}\ng['write'](1, b'w' * 10 ** 7)\nreturn 1"), {S.OUTPUT_TOO_LARGE}),
    ("socket", prog("import socket\nsocket.socket().connect(('1.1.1.1', 53))\nreturn 1"), {S.FORBIDDEN}),
    ("unix_socket", prog("import socket\nsocket.socket(socket.AF_UNIX).connect('/x')\nreturn 1"), {S.FORBIDDEN}),
    ("ptrace_supervisor", prog("import ctypes\nctypes.CDLL(None).ptrace(16, 1, 0, 0)\nreturn 1"), {S.FORBIDDEN}),
    ("unshare_again", prog("import ctypes\nctypes.CDLL(None).unshare(0x10000000)\nreturn 1"), {S.FORBIDDEN}),
    (
        "mount",
        prog("import ctypes\nctypes.CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None)\nreturn 1"),
        {S.FORBIDDEN},
    ),
    ("exec_a_shell", prog(f"g = {OS}\ng['execv']('/bin/sh', ['sh', '-c', 'true'])"), {S.FORBIDDEN}),
    ("abort_signal", prog(f"g = {OS}\ng['abort']()"), {S.KILLED}),
    ("hard_exit", prog(f"g = {OS}\ng['_exit'](0)"), {S.NO_RESULT}),
    ("deep_recursion", prog("def f(n):\n    return f(n + 1)\nreturn f(0)"), {S.EXCEPTION}),
    ("system_exit", prog("raise SystemExit(0)"), {S.EXCEPTION}),
    ("syntax_error", "def solution(:\n    return 1\n", {S.SYNTAX_ERROR}),
    ("no_solution", "x = 3\n", {S.NO_RESULT}),
    ("returns_none", prog("pass"), {S.NO_RESULT}),
    ("returns_text", prog("return 'seven'"), {S.NOT_A_NUMBER}),
    ("returns_nan", prog("return float('nan')"), {S.NOT_A_NUMBER}),
    # Forged verdicts: a report line on stdout, a frame of the supervisor's protocol, a status
    # the program's process may not claim, and the supervisor's own pipe reached through /proc.
    (
        "forged_report_line",
        prog(f'g = {OS}\nprint(\'{{"status": "OK", "value": 42}}\', flush=True)\ng[\'_exit\'](0)'),
        {S.NO_RESULT},
    ),
    (
        "forged_frame_on_stdout",
        prog(
            f'g = {OS}\nd = b\'{{"status": "OK", "value": 42, "stdout": ""}}\'\n'
            "g['write'](1, len(d).to_bytes(4, 'big') + d)\ng['_exit'](0)"
        ),
        {S.NO_RESULT},
    ),
    ("claims_timeout", prog(f"g = {OS}\ng['write'](3, b'{{\"status\": \"TIMEOUT\"}}')\ng['_exit'](0)"), {S.NO_RESULT}),
    (
        "supervisor_pipe_via_proc",
        prog(f"g = {OS}\nfd = g['open']('/proc/1/fd/1', g['O_WRONLY'])\ng['write'](fd, b'x')\nreturn 42"),
        {S.EXCEPTION},
    ),
    ("supervisor_memory_via_proc", prog("return len(open('/proc/1/mem', 'rb').read(1))"), {S.EXCEPTION}),
]


@pytest.mark.parametrize("name,source,expected", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_boundary(boundary, name, source, expected):
    result = run(boundary, source)
    assert result.status in expected, (result.status, result.error, result.stdout[-300:])
    assert result.value is None


@pytest.mark.parametrize("reach_os", [OS_BY_SUBCLASSES, OS_BY_MODULE_ATTRIBUTE, OS_BY_FRAMES])
def test_files_and_environment_of_the_trainer_are_not_there(boundary, secret_file, reach_os):
    """With ``os`` in hand: the secret file, the trainer's environment and /proc hold nothing of the trainer."""
    body = f"""
g = {reach_os}
found = 0
for path in [{str(secret_file)!r}, '/etc/passwd', '/etc/hostname']:
    try:
        found += {SECRET!r} in open(path).read() or 1000
    except OSError:
        pass
for pid in g['listdir']('/proc'):
    if pid.isdigit():
        try:
            found += {SECRET!r}.encode() in open('/proc/' + pid + '/environ', 'rb').read()
        except OSError:
            pass
found += 100 * any({SECRET!r} in v for v in g['environ'].values())
return found
"""
    result = run(boundary, prog(body, "import sys"))
    assert result.status is S.OK, (result.status, result.error)
    assert result.value == 0.0, "the sandbox could read the trainer's files or environment"


def test_only_its_own_processes_are_visible(boundary):
    result = run(boundary, prog(f"g = {OS}\nreturn len([p for p in g['listdir']('/proc') if p.isdigit()])"))
    assert result.status is S.OK
    assert result.value <= 2  # the supervisor (PID 1) and the program


def test_root_inside_is_not_root_outside(boundary, tmp_path):
    """uid 0 inside, but without capabilities, on a read-only root; host paths stay untouched."""
    home, host_tmp = Path.home() / "carft-sbx-pwned", Path("/tmp/carft-sbx-pwned")
    body = f"""
g = {OS}
wrote = 0
for path in [{str(home)!r}, '/usr/carft-sbx-pwned', '/carft-sbx-pwned', {str(tmp_path / "pwned")!r}]:
    try:
        open(path, 'w').write('x')
        wrote += 1
    except OSError:
        pass
open('/tmp/carft-sbx-pwned', 'w').write('x')  # the sandbox's own tmpfs
caps = [line for line in open('/proc/self/status') if line.startswith('CapEff')][0].split()[1]
return wrote * 1000 + (g['getuid']() == 0) * 10 + (int(caps, 16) != 0)
"""
    result = run(boundary, prog(body))
    assert result.status is S.OK, (result.status, result.error)
    assert result.value == 10.0, "wrote outside scratch or holds capabilities"
    assert not home.exists() and not host_tmp.exists() and not (tmp_path / "pwned").exists()


def test_fork_and_setsid_grandchildren_die_with_the_program(boundary):
    body = f"""
g = {OS}
for _ in range(3):
    if g['fork']() == 0:
        g['setsid']()
        if g['fork']() == 0:
            while True:
                pass
        g['_exit'](0)
return 7
"""
    result = run(boundary, prog(body))  # run() asserts no process is left
    assert result.status is S.OK and result.value == 7.0


def test_fork_bomb_ends_typed_and_leaves_nothing(boundary):
    result = run(boundary, prog(f"g = {OS}\nwhile True:\n    g['fork']()"))
    # Its forks all answer on the one answer pipe: whichever failure, never OK.
    assert result.status in {S.TIMEOUT, S.EXCEPTION, S.MEMORY, S.NO_RESULT}, (result.status, result.error)


def test_killing_the_supervisor_from_inside_fails_and_the_next_program_runs(boundary):
    body = f"""
g = {OS}
g['kill'](g['getppid'](), 9)
g['kill'](1, 9)
try:
    g['kill'](-1, 9)  # everyone else in the namespace: nobody
except OSError:
    pass
return 5
"""
    result = run(boundary, prog(body))
    assert result.status is S.OK and result.value == 5.0  # PID 1 ignores signals from inside its namespace
    assert run(boundary, prog("return 6")).value == 6.0


def test_filling_the_disk_stays_in_scratch(boundary):
    before = os.statvfs("/tmp").f_bfree
    body = "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 60000)\n    i += 1"
    result = run(boundary, prog(body))
    assert result.status is S.EXCEPTION and ("No space" in result.error or "Errno 28" in result.error), result.error
    assert abs(os.statvfs("/tmp").f_bfree - before) * os.statvfs("/tmp").f_frsize < 8 << 20
    assert run(boundary, prog("import os\nreturn 1")).value == 1.0  # inner layer off: os imports; scratch was emptied


def test_rlimit_cpu_stops_a_busy_loop_before_the_wall_clock():
    pool = SandboxPool(limits(timeout_s=20.0, inner_policy=False))
    try:
        result = run(pool, prog("while True:\n    pass"))
    finally:
        pool.close()
    assert result.status is S.TIMEOUT and "RLIMIT_CPU" in result.error
    assert result.duration_s < 10.0


def test_output_is_captured_and_bounded(boundary):
    result = run(boundary, prog("print('hello')\nreturn 2"))
    assert (result.status, result.value, result.stdout) == (S.OK, 2.0, "hello\n")


def test_programs_in_parallel_each_get_their_own_verdict(boundary):
    sources = [
        prog("while True:\n    pass"),
        prog("return 1"),
        prog("import socket\nsocket.socket()"),
        prog("return 2"),
    ]
    results = boundary.run(sources * 3)
    assert [r.status for r in results] == [S.TIMEOUT, S.OK, S.FORBIDDEN, S.OK] * 3
    assert [r.value for r in results if r.ok] == [1.0, 2.0] * 3
    assert leftovers(boundary) == []


# The inner layer: clearer messages for common mistakes, and no safety when fooled.
def test_inner_layer_names_what_it_refused(layered):
    assert "import of 'os'" in run(layered, prog("return 1", "import os")).error
    result = run(layered, prog("return len(open('/etc/passwd').read())"))
    assert result.status is S.FORBIDDEN and "/etc/passwd" in result.error


def test_inner_layer_switched_off_from_inside_changes_nothing_outside(layered, secret_file):
    """The program finds the layer through its own builtins, switches it off and reads: nothing is there."""
    body = f"""
layer = __builtins__['__import__'].__self__
layer.active = False
layer.violations.clear()
layer._refuse = lambda what: None
g = {OS}
try:
    return len(open({str(secret_file)!r}).read())
except OSError:
    return -1
"""
    result = run(layered, prog(body))
    assert result.status is S.OK and result.value == -1.0


def test_a_dead_sandbox_is_replaced(boundary):
    slot = boundary._slots.queue[0]
    if slot.proc is None:
        boundary.run([prog("return 1")] * 2)
    for s in list(boundary._slots.queue):
        if s.proc is not None:
            os.kill(s.proc.pid, 9)
    time.sleep(0.2)
    results = boundary.run([prog("return 3")] * 4)
    assert {r.status for r in results} <= {S.KILLED, S.OK}
    assert boundary.run([prog("return 4")])[0].value == 4.0
