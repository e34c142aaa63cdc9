"""Which boundary the sandbox uses, its refusal to start without one, the opt-in weak mode,
the reward server's start-up check, a trainer killed mid-batch, and bubblewrap for an
unprivileged trainer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest

from carft_nemo.data.records import Example
from carft_nemo.rewards.sandbox import IsolationUnavailable, SandboxConfig, SandboxPool, SandboxStatus, isolation
from carft_nemo.workers.reward import RewardWorker

ROOT = Path(__file__).resolve().parents[3]
NONE_AVAILABLE = {"bwrap": "", "user_namespaces": False}  # a cluster without bubblewrap or user namespaces


def test_without_any_boundary_start_up_fails_saying_what_to_do():
    with pytest.raises(IsolationUnavailable) as err:
        SandboxPool(SandboxConfig(**NONE_AVAILABLE))
    message = str(err.value)
    for needed in ("bubblewrap", "user.max_user_namespaces", "reward.sandbox.isolation", "apt-get install bubblewrap"):
        assert needed in message, message


def test_an_explicit_backend_that_is_missing_is_refused():
    with pytest.raises(IsolationUnavailable, match="bubblewrap: 'no-such-bwrap' not found"):
        SandboxPool(SandboxConfig(isolation="bwrap", bwrap="no-such-bwrap"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-trainer rule")
def test_a_root_trainer_does_not_get_bubblewrap():
    """bubblewrap would map the sandbox's root to root outside; auto takes the namespaces instead."""
    if shutil.which("bwrap"):
        with pytest.raises(IsolationUnavailable, match="runs as root"):
            SandboxPool(SandboxConfig(isolation="bwrap"))
    assert isolation.choose(SandboxConfig()) == "namespaces"


def test_the_weak_mode_runs_only_when_chosen_and_warns_once(monkeypatch):
    monkeypatch.setattr(isolation, "_warned_weak", False)
    with pytest.warns(RuntimeWarning, match="without an operating-system boundary"):
        pool = SandboxPool(SandboxConfig(isolation="process", **NONE_AVAILABLE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = SandboxPool(SandboxConfig(isolation="process", timeout_s=2.0))
    try:
        result = pool.run(["def solution():\n    return 40 + 2\n"])[0]
        assert (result.status, result.value) == (SandboxStatus.OK, 42.0)
        assert second.run(["import os\ndef solution():\n    return 1\n"])[0].status is SandboxStatus.FORBIDDEN
    finally:
        pool.close()
        second.close()


def test_the_reward_server_checks_the_boundary_at_start_up():
    with pytest.raises(IsolationUnavailable):
        RewardWorker(sandbox=SandboxConfig(**NONE_AVAILABLE), runs_programs=True)
    RewardWorker(sandbox=SandboxConfig(**NONE_AVAILABLE), runs_programs=False)  # N-CoT: no programs, no check


def test_the_reward_server_scores_programs_in_its_sandboxes():
    worker = RewardWorker(sandbox=SandboxConfig(timeout_s=2.0), runs_programs=True)
    example = Example("svamp_1", "How many?", "def solution():\n    return 3\n", 7.0, "pcot")
    programs = [
        "def solution():\n    return 3 + 4\n",  # right
        "def solution():\n    return 2 + 4\n",  # wrong but a number
        "def solution():\n    while True:\n        pass\n",  # no answer in time
        "def solution():\n    import socket\n    socket.socket()\n",  # refused by the boundary
    ]
    scored = worker.score(programs, [example] * len(programs))
    assert [(s.reward, s.correct, s.extracted) for s in scored] == [
        (1.0, True, True),
        (0.1, False, True),
        (0.0, False, False),
        (0.0, False, False),
    ]
    assert [s.failure for s in scored[2:]] == ["TIMEOUT", "FORBIDDEN"]


KILLED_TRAINER = """
import sys
from carft_nemo.rewards.sandbox import SandboxConfig, run_programs
print("go", flush=True)
sleeper = "def solution():\\n    import time\\n    time.sleep(600)\\n"
run_programs([sleeper] * 4, SandboxConfig(timeout_s=600, max_workers=2))
"""


def test_killing_the_trainer_mid_batch_leaves_no_process_and_no_scratch():
    before = set(Path("/tmp").glob("carft-sbx-*"))
    trainer = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINER],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert trainer.stdout.readline().strip() == b"go"
    deadline = time.monotonic() + 60
    while True:  # two sandboxes, each running a program: waiter, PID 1, program
        family = psutil.Process(trainer.pid).children(recursive=True)
        if len(family) >= 6:
            break
        assert time.monotonic() < deadline, f"sandboxes did not start: {family}"
        time.sleep(0.1)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while alive := [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"left behind: {alive}"
        time.sleep(0.05)
    assert set(Path("/tmp").glob("carft-sbx-*")) == before


UNPRIVILEGED_TRAINER = """
import json, sys
from carft_nemo.rewards.sandbox import SandboxConfig, SandboxPool
OS = "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__"
secret = sys.argv[1]
programs = {
    "answer": "def solution():\\n    return 6 * 7\\n",
    "secret": f"def solution():\\n    return len(open({secret!r}).read())\\n",
    "socket": "def solution():\\n    import socket\\n    socket.socket()\\n",
    "write_outside": f"def solution():\\n    open({secret!r} + '.written', 'w')\\n",
    "processes": f"def solution():\\n    g = {OS}\\n    return sum(p.isdigit() for p in g['listdir']('/proc'))\\n",
    "uid": f"def solution():\\n    g = {OS}\\n    return g['getuid']()\\n",
}
pool = SandboxPool(SandboxConfig(isolation="bwrap", inner_policy=False))
results = pool.run(list(programs.values()))
print(json.dumps({name: [r.status.value, r.value] for name, r in zip(programs, results)}))
pool.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the trainer as an unprivileged user")
def test_bubblewrap_for_an_unprivileged_trainer():
    """The trainer as uid 65534 on the system interpreter: bubblewrap maps the sandbox to that uid."""
    if shutil.which("bwrap") is None:
        if os.environ.get("CI"):
            pytest.fail("bubblewrap is missing: .ci/run installs it (Debian package bubblewrap)")
        pytest.skip("bubblewrap not installed (Debian package bubblewrap; .ci/run installs it)")
    system_python = "/usr/bin/python3"  # ours may sit under a 0700 home (pyenv under /root)
    version = subprocess.run([system_python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    if version.stdout.decode().strip() != str(sys.version_info[:2]):
        pytest.skip(f"{system_python} is not Python {sys.version_info[:2]}: our site-packages would not load")
    path = f"{ROOT}:{sysconfig.get_paths()['purelib']}"  # the package and its dependencies
    folder = Path(tempfile.mkdtemp(prefix="carft-secret-"))
    try:
        folder.chmod(0o777)
        secret = folder / "secret.txt"
        secret.write_text("carft-test-secret")  # readable and its folder writable by uid 65534 outside
        secret.chmod(0o644)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", system_python, "-c",
             UNPRIVILEGED_TRAINER, str(secret)],
            capture_output=True, text=True, timeout=120, cwd="/", env={"PYTHONPATH": path},
        )  # fmt: skip
        written = Path(f"{secret}.written").exists()
    finally:
        shutil.rmtree(folder)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["answer"] == ["OK", 42.0]
    assert got["secret"][0] == "EXCEPTION"  # not there, though uid 65534 may read it outside
    assert got["socket"][0] == "FORBIDDEN"
    assert got["write_outside"][0] == "EXCEPTION" and not written
    assert got["processes"] == ["OK", 2.0]
    assert got["uid"] == ["OK", 65534.0]
