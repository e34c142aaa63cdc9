"""Where a process sits in the job, read from torchrun's or Slurm's environment."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError
from carft_nemo.distributed import slurm
from carft_nemo.distributed.layout import ProcessInfo

NODELISTS = ["gpu[03-05],gpu7", "n[1-2,10],ab[009-011]", "rack[1-2]-gpu[1-2]", "single", "a[8-11]"]
# What Slurm itself prints for them (the fallback parser must agree without scontrol)
EXPANDED = {
    "gpu[03-05],gpu7": ["gpu03", "gpu04", "gpu05", "gpu7"],
    "n[1-2,10],ab[009-011]": ["n1", "n2", "n10", "ab009", "ab010", "ab011"],
    "rack[1-2]-gpu[1-2]": ["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"],
    "single": ["single"],
    "a[8-11]": ["a8", "a9", "a10", "a11"],
}


def test_torchrun_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29411",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }  # torchrun inside an allocation wins over Slurm's
    assert ProcessInfo.from_env(env) == ProcessInfo(3, 4, 1, "node7", 29411)


def test_slurm_srun_variables_without_master(monkeypatch) -> None:
    monkeypatch.setattr(slurm, "scontrol_hostnames", lambda nodelist: None)  # the fallback path
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[03-05],gpu7",
    }
    info = ProcessInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (5, 8, 1, "gpu03")
    assert info.master_port == 20000 + 123456 % 20000


def test_slurm_step_nodelist_and_exported_master_win() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "gpu[01-09]",
        "SLURM_STEP_NODELIST": "gpu[04-05]",
        "MASTER_PORT": "31000",
    }
    assert slurm.first_host(env) == "gpu04"
    assert ProcessInfo.from_env(env).master_port == 31000
    env["MASTER_ADDR"] = "10.0.0.9"
    assert ProcessInfo.from_env(env).master_addr == "10.0.0.9"


def test_single_process_without_launcher() -> None:
    info = ProcessInfo.from_env({})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (0, 1, 0, "127.0.0.1")
    assert 0 < info.master_port < 65536


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_fallback_parser(nodelist: str) -> None:
    assert slurm.expand_nodelist(nodelist) == EXPANDED[nodelist]


@pytest.mark.parametrize("bad", ["gpu[03-05", "gpu03]", "gpu[5-3]", "gpu[a-b]"])
def test_fallback_parser_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="SLURM nodelist"):
        slurm.expand_nodelist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm not installed (apt-get install slurm-wlm)")
def test_parser_agrees_with_scontrol(tmp_path: Path, monkeypatch) -> None:
    # scontrol only needs a readable configuration to expand host lists (no daemon)
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=carft\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
        "PartitionName=debug Nodes=localhost Default=YES\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    for nodelist in NODELISTS:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=30,
            check=True,
        )
        assert out.stdout.split() == slurm.expand_nodelist(nodelist), nodelist
        assert slurm.scontrol_hostnames(nodelist) == out.stdout.split()
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[03-05],gpu7"}
    assert ProcessInfo.from_env(env).master_addr == "gpu03"
