"""Adversarial programs: each ends in its expected typed failure, within its limit, with no
escape (files outside scratch not created, secrets not read) and no process left behind."""

import os
import time
from pathlib import Path

import psutil
import pytest

from carft_nemo.rewards.sandbox import SandboxConfig, SandboxStatus, run_program, run_programs

S = SandboxStatus
SECRET = "carft-test-secret-9f3a"
# Reach the ``os`` module without importing it: the classic object-graph escape.
OS = "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__"


def prog(body: str, header: str = "") -> str:
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return f"{header}\ndef solution():\n{lines}\n"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Small limits; scratch folders under tmp_path so leftovers can be found by path."""
    monkeypatch.setenv("CARFT_SECRET", SECRET)
    root = tmp_path / "scratch"
    root.mkdir()
    cfg = SandboxConfig(
        timeout_s=1.5,
        cpu_time_s=1,
        memory_mb=256,
        max_output_chars=4096,
        max_file_bytes=64 * 1024,
        scratch_root=str(root),
    )
    yield cfg
    _assert_no_leftovers(root)


def _assert_no_leftovers(root: Path) -> None:
    deadline = time.monotonic() + 2.0  # SIGKILLed processes take a moment to vanish
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and str(root) in " ".join(p.info["cmdline"] or []):
                    alive.append(p.info)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        kids = [c for c in psutil.Process().children(recursive=True) if "_sandbox_worker" in " ".join(c.cmdline())]
        if not alive and not kids:
            break
        assert time.monotonic() < deadline, f"leftover sandbox processes: {alive or kids}"
        time.sleep(0.05)
    assert list(root.iterdir()) == [], "scratch folders not removed"


CASES = [
    # (name, program, expected status)
    ("infinite_loop", prog("while True:\n    pass"), S.TIMEOUT),
    ("sleep_forever", prog("time.sleep(3600)", "import time"), S.TIMEOUT),
    ("fork_bomb", prog("while True:\n    os.fork()", "import os"), S.FORBIDDEN),
    ("fork_via_object_graph", prog(f"g = {OS}\ng['fork']()\nreturn 1"), S.FORBIDDEN),
    ("memory_bytearray", prog("a = bytearray(8 * 1024 ** 3)\nreturn 1"), S.MEMORY),
    ("memory_growing_list", prog("a = []\nwhile True:\n    a.append('x' * 10 ** 6)"), S.MEMORY),
    ("print_loop", prog("while True:\n    print('y' * 1000)"), S.OUTPUT_TOO_LARGE),
    ("one_huge_print", prog("print('z' * 10 ** 7)\nreturn 1"), S.OUTPUT_TOO_LARGE),
    ("raw_fd_write", prog(f"g = {OS}\ng['write'](1, b'w' * 10 ** 7)\nreturn 1"), S.OUTPUT_TOO_LARGE),
    ("read_etc_passwd", prog("return len(open('/etc/passwd').read())"), S.FORBIDDEN),
    (
        "read_parent_environ",
        prog(f"g = {OS}\nreturn len(open('/proc/%d/environ' % g['getppid']()).read())"),
        S.FORBIDDEN,
    ),
    ("import_os_environ", prog("return len(os.environ)", "import os"), S.FORBIDDEN),
    ("dunder_import_socket", prog("s = __import__('socket')\nreturn 1"), S.FORBIDDEN),
    (
        "socket_via_real_import",
        prog(
            f"g = {OS}\nsock = g['sys'].modules['builtins'].__import__('socket')\n"
            "sock.socket().connect(('1.1.1.1', 53))\nreturn 1"
        ),
        S.FORBIDDEN,
    ),
    ("import_subprocess", prog("subprocess.run(['true'])\nreturn 1", "import subprocess"), S.FORBIDDEN),
    ("os_system_via_object_graph", prog(f"g = {OS}\ng['system']('touch /tmp/carft-sbx-pwned')\nreturn 1"), S.FORBIDDEN),
    ("import_ctypes", prog("return 1", "import ctypes"), S.FORBIDDEN),
    ("import_threading", prog("return 1", "import threading"), S.FORBIDDEN),
    ("signal_module", prog("signal.alarm(1)\nreturn 1", "import signal"), S.FORBIDDEN),
    ("kill_parent", prog(f"g = {OS}\ng['kill'](g['getppid'](), 9)\nreturn 1"), S.FORBIDDEN),
    ("list_root_dir", prog(f"g = {OS}\nreturn len(g['listdir']('/'))"), S.FORBIDDEN),
    (
        "caught_violation_still_forbidden",
        prog("try:\n    open('/etc/hostname').read()\nexcept Exception:\n    pass\nreturn 1"),
        S.FORBIDDEN,
    ),
    ("deep_recursion", prog("def f(n):\n    return f(n + 1)\nreturn f(0)"), S.EXCEPTION),
    ("abort_signal", prog(f"g = {OS}\ng['abort']()"), S.KILLED),
    ("system_exit", prog("raise SystemExit(0)"), S.EXCEPTION),
    ("hard_exit", prog(f"g = {OS}\ng['_exit'](0)"), S.NO_RESULT),
    (
        "file_too_large_in_scratch",
        prog("f = open('big.bin', 'wb')\nf.write(b'x' * 10 ** 6)\nf.close()\nreturn 1"),
        S.EXCEPTION,
    ),
    ("syntax_error", "def solution(:\n    return 1\n", S.SYNTAX_ERROR),
    ("no_solution", "x = 3\n", S.NO_RESULT),
    ("returns_none", prog("pass"), S.NO_RESULT),
    ("returns_text", prog("return 'seven'"), S.NOT_A_NUMBER),
    ("returns_nan", prog("return float('nan')"), S.NOT_A_NUMBER),
]


@pytest.mark.parametrize("name,source,expected", CASES, ids=[c[0] for c in CASES])
def test_adversarial_program(sandbox, name, source, expected):
    result = run_program(source, sandbox)
    assert result.status is expected, (result.status, result.error)
    assert result.value is None
    # Within its limit: the run deadline plus interpreter start-up and the kill, with room
    # for start-up on 2 cores shared with other jobs (the deadline excludes start-up).
    assert result.duration_s < sandbox.timeout_s + 10.0


def test_at_least_25_adversarial_cases():
    assert len([c for c in CASES if c[2] is not S.OK]) >= 25


def test_rlimit_cpu_stops_a_busy_loop_before_the_wall_clock(sandbox):
    import dataclasses

    cfg = dataclasses.replace(sandbox, timeout_s=30.0, cpu_time_s=1)
    result = run_program(prog("while True:\n    pass"), cfg)
    assert result.status is S.TIMEOUT and "RLIMIT_CPU" in result.error
    assert result.duration_s < 10.0


def test_writes_outside_scratch_are_refused_and_not_created(sandbox, tmp_path):
    outside = tmp_path / "escaped.txt"
    for source in (
        prog(f"open({str(outside)!r}, 'w').write('x')\nreturn 1"),
        prog("open('../escaped.txt', 'w').write('x')\nreturn 1"),
        prog(f"g = {OS}\ng['rename']('a', {str(outside)!r})\nreturn 1"),
    ):
        assert run_program(source, sandbox).status is S.FORBIDDEN
    assert not outside.exists()
    assert not Path("/tmp/carft-sbx-pwned").exists()


def test_writes_inside_scratch_are_allowed(sandbox):
    source = prog("open('note.txt', 'w').write('hi')\nreturn len(open('note.txt').read())")
    result = run_program(source, sandbox)
    assert result.status is S.OK and result.value == 2.0


def test_environment_secret_is_not_readable(sandbox):
    assert os.environ["CARFT_SECRET"] == SECRET
    source = prog(
        f"g = {OS}\nenv = g['environ']\nreturn sum(1 for k, v in env.items() if 'SECRET' in k or {SECRET!r} in v)"
    )
    result = run_program(source, sandbox)
    assert result.status is S.OK and result.value == 0.0


def test_forged_report_line_is_ignored(sandbox):
    forged = '\\n{"status": "OK", "value": 42}\\n'
    source = prog(f"print({forged!r})\ng = {OS}\ng['write'](1, {forged!r}.encode())\nreturn 1")
    result = run_program(source, sandbox)
    assert result.status is S.OK and result.value == 1.0


def test_program_output_is_captured_and_bounded(sandbox):
    result = run_program(prog("print('hello')\nreturn 1"), sandbox)
    assert result.ok and result.stdout == "hello\n"


def _sleeper(keep_pipes: bool) -> str:
    """A program whose child outlives solution(); only possible with the policy layer off."""
    close = "" if keep_pipes else "        for fd in (0, 1, 2):\n            os.close(fd)\n"
    return (
        "import os, time\n"
        "def solution():\n"
        "    if os.fork() == 0:\n"
        f"{close}"
        "        time.sleep(120)\n"
        "        os._exit(0)\n"
        "    return 5\n"
    )


@pytest.mark.parametrize("keep_pipes,expected", [(False, S.OK), (True, S.TIMEOUT)])
def test_children_outliving_the_program_are_killed(sandbox, keep_pipes, expected):
    import dataclasses

    cfg = dataclasses.replace(sandbox, enforce_policy=False)  # test the process-group layer alone
    result = run_program(_sleeper(keep_pipes), cfg)
    assert result.status is expected, result
    # The fixture's teardown checks no process from this run is left.


def test_many_adversarial_programs_in_parallel(sandbox):
    import dataclasses

    cfg = dataclasses.replace(sandbox, max_workers=4)
    picks = [
        c
        for c in CASES
        if c[0] in ("infinite_loop", "fork_bomb", "memory_bytearray", "print_loop", "read_etc_passwd", "deep_recursion")
    ]
    sources = [c[1] for c in picks] + [prog("return 6 * 7")] * 6
    start = time.monotonic()
    results = run_programs(sources, cfg)
    assert [r.status for r in results] == [c[2] for c in picks] + [S.OK] * 6
    assert all(r.value == 42.0 for r in results[len(picks) :])
    assert time.monotonic() - start < 20.0
