"""slurm/rl.sbatch: syntax, and its helper functions run for real in bash (sourced, no Slurm).

The signal test sends a real SIGUSR1 to the bash running ``run_forwarding`` and checks that the
controller stand-in receives it; the requeue test reads a real summary.json through the real
config loader. The slow test starts a real one-node Ray head and waits for its GPUs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "rl.sbatch"
PYTHON = sys.executable


def _bash(body: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``body`` in bash after sourcing the script (functions only), with a clean Slurm env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CARFT_"))}
    base.update(PYTHON=PYTHON, REPO=str(ROOT), **(env or {}))
    return subprocess.run(
        ["bash", "-c", f'source "{SCRIPT}"\n{body}'], env=base, capture_output=True, text=True, timeout=timeout
    )


def test_syntax() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_header_signals_the_batch_shell_only() -> None:
    """USR1 must reach this script (which forwards it), not Ray's processes (they would die)."""
    lines = SCRIPT.read_text().splitlines()
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert "--signal=B:USR1@300" in directives
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives


def test_sourcing_defines_functions_without_running() -> None:
    result = _bash("type -t main run_forwarding should_requeue wait_for_cluster start_ray_node gpus_per_node ray_port")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["function"] * 7


@pytest.mark.parametrize(("node", "index"), [("n1", 0), ("n3", 2), ("n2", 1)])
def test_start_ray_node_names_the_node_by_its_place_in_the_job(node: str, index: int, tmp_path: Path) -> None:
    """`ray start` gets carft_node_<i>, i the node's place in the job's node list (``<role>.nodes``)."""
    fake_ray = tmp_path / "ray"
    fake_ray.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake_ray.chmod(0o755)
    env = {"CARFT_RAY_CLI": str(fake_ray), "CARFT_NODE_LIST": "n1 n2 n3 ", "SLURMD_NODENAME": node}
    result = _bash("start_ray_node --block --num-cpus=2", env)
    assert result.returncode == 0, result.stderr
    resources = f'--resources={{"carft_node_{index}": 10000}}'
    said = f"ray on {node}: node {index} of the job (carft_node_{index})"
    assert result.stdout.splitlines() == [said, "start", "--block", "--num-cpus=2", resources]


def test_start_ray_node_refuses_a_node_outside_the_job(tmp_path: Path) -> None:
    env = {"CARFT_RAY_CLI": str(tmp_path / "no-ray"), "CARFT_NODE_LIST": "n1 n2 ", "SLURMD_NODENAME": "n9"}
    result = _bash("start_ray_node --block", env)
    assert result.returncode == 1 and "this node (n9) is not in the job's node list (n1 n2 )" in result.stderr


def test_main_needs_a_config_and_an_allocation() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    no_config = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert no_config.returncode != 0 and "usage: sbatch" in no_config.stderr
    no_job = subprocess.run(
        ["bash", str(SCRIPT), "configs/reft-tiny-synthetic.yaml"], env=env, capture_output=True, text=True, timeout=30
    )
    assert no_job.returncode != 0 and "run this script with sbatch" in no_job.stderr


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:2"}, "2"),
        ({"SLURM_GPUS_ON_NODE": "8", "CARFT_GPUS_PER_NODE": "6"}, "6"),
    ],
)
def test_gpus_per_node(env: dict[str, str], expected: str) -> None:
    result = _bash("gpus_per_node", env)
    assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr


def test_gpus_per_node_unknown_is_an_error() -> None:
    result = _bash("gpus_per_node")
    assert result.returncode == 1 and "CARFT_GPUS_PER_NODE" in result.stderr
    assert _bash("gpus_per_node", {"SLURM_GPUS_PER_NODE": "a100:4,v100:2"}).returncode == 1


def test_ray_port_per_job() -> None:
    assert _bash("ray_port", {"SLURM_JOB_ID": "123456"}).stdout.strip() == "43456"
    assert _bash("ray_port", {"SLURM_JOB_ID": "7"}).stdout.strip() == "40007"
    assert _bash("ray_port", {"SLURM_JOB_ID": "7", "CARFT_RAY_PORT": "6379"}).stdout.strip() == "6379"


_CONTROLLER = """
import signal, sys, time
from pathlib import Path
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
Path(sys.argv[1]).write_text("ready")
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(7 if got else 3)
"""


def _signal_when_ready(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)


def test_sigusr1_is_forwarded_to_the_controller(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    (tmp_path / "controller.py").write_text(_CONTROLLER)
    body = f'run_forwarding "$PYTHON" "{tmp_path / "controller.py"}" "{ready}"; echo "status=$? forwarded=$FORWARDED"'
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=PYTHON, REPO=str(ROOT))
    proc = subprocess.Popen(["bash", "-c", f'source "{SCRIPT}"\n{body}'], env=env, stdout=subprocess.PIPE, text=True)
    _signal_when_ready(proc, ready)
    out, _ = proc.communicate(timeout=60)
    # The shell survived the signal, the child got it and its own exit status came back.
    assert out.strip() == "status=7 forwarded=USR1"


def test_a_controller_killed_by_the_forwarded_signal_is_requeued(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"from pathlib import Path; import time; Path({str(ready)!r}).write_text('x'); time.sleep(30)"
    body = (
        f'run_forwarding "$PYTHON" -c "{script}"; s=$?; echo "status=$s"; '
        "should_requeue $s configs/reft-tiny-synthetic.yaml && echo requeue || echo done"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=PYTHON, REPO=str(ROOT))
    proc = subprocess.Popen(["bash", "-c", f'source "{SCRIPT}"\n{body}'], env=env, stdout=subprocess.PIPE, text=True)
    _signal_when_ready(proc, ready)
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [f"status={128 + signal.SIGUSR1}", "requeue"]


def test_exit_status_passes_through_without_a_signal() -> None:
    result = _bash('run_forwarding "$PYTHON" -c "raise SystemExit(5)"; echo "status=$? forwarded=$FORWARDED"')
    assert result.stdout.strip() == "status=5 forwarded="


@pytest.mark.parametrize(
    "summary,status,requeue",
    [
        ({"stopped_early": True}, 0, True),
        ({"stopped_early": False}, 0, False),
        (None, 0, False),
        ({"stopped_early": True}, 1, False),  # a failed run is not resumed blindly
        ({"stopped_early": True}, 138, False),  # killed by USR1 that this script did not forward
    ],
)
def test_should_requeue_reads_summary_json(tmp_path: Path, summary: dict | None, status: int, requeue: bool) -> None:
    out = tmp_path / "run"
    out.mkdir()
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
    result = _bash(f'should_requeue {status} configs/reft-tiny-synthetic.yaml output_dir="{out}" rl.steps=3')
    assert result.returncode == (0 if requeue else 1), result.stderr


def test_wait_for_cluster_gives_up_without_a_head() -> None:
    """Nothing listens on the port: not even a request for 0 GPUs passes, and the wait is bounded."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.monotonic()
        result = _bash(f"wait_for_cluster 127.0.0.1:{port} 1 0 2", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not reachable yet: ConnectionRefusedError" in result.stdout
    assert "0 of 1 nodes, 0 of 0 GPUs" in result.stdout and time.monotonic() - t0 < 60


@pytest.mark.slow
def test_wait_for_cluster_against_a_real_ray_head() -> None:
    """A one-node Ray head declaring 2 GPUs, token auth as the script sets it up."""
    ray_cli = Path(PYTHON).parent / "ray"
    if not ray_cli.exists():
        pytest.skip("no ray CLI next to the interpreter")
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths live under it
    port = 46000 + os.getpid() % 3000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHON=PYTHON, REPO=str(ROOT))
    ip = subprocess.run(
        ["bash", "-c", f'source "{SCRIPT}"\nnode_ip'], env=env, capture_output=True, text=True, timeout=120
    ).stdout.strip()
    assert ip, "node_ip printed nothing"
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={ip}",
            f"--port={port}",
            "--num-cpus=1",
            "--num-gpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def wait(nodes: int, count: int, timeout_s: int) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["bash", "-c", f'source "{SCRIPT}"\nwait_for_cluster {ip}:{port} {nodes} {count} {timeout_s}'],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )

        ok = wait(1, 2, 180)
        assert ok.returncode == 0 and "1 of 1 nodes, 2 of 2 GPUs" in ok.stdout, ok.stdout + ok.stderr
        short = wait(1, 4, 3)  # a worker node that never joins
        assert short.returncode == 1 and "2 of 4 GPUs" in short.stdout, short.stdout + short.stderr
        no_node = wait(2, 0, 3)  # CPU nodes: the node count decides
        assert no_node.returncode == 1 and "1 of 2 nodes" in no_node.stdout, no_node.stdout + no_node.stderr
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
