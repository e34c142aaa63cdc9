"""A real one-node Slurm cluster (munged, slurmctld, slurmd) inside a private network namespace.

The namespace has loopback and a veth pair that routes nowhere, so the daemons, the job's Ray
head (whose ``ray start`` swaps 127.0.0.1 for a routable address unless there is none) and
every worker talk over 127.0.0.1 and nothing can leave the namespace. Each cluster gets its
own namespace, so Slurm's fixed ports never collide with another test run on the host.
Needs root, Debian's ``slurm-wlm`` and ``munge``, ``ip`` (iproute2) and ``nsenter`` (util-linux).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TOOLS = ("munged", "slurmctld", "slurmd", "mungekey", "sbatch", "scancel", "sinfo", "scontrol", "ip", "nsenter")
START_TIMEOUT_S = 30.0
CLUSTER_DAEMONS = {"munged", "slurmctld", "slurmscriptd", "slurmd"}  # slurmscriptd: slurmctld's helper


def require_slurm() -> None:
    """Skip where Slurm cannot run (no root, missing tools); under CI (which installs it), fail instead."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    reason = (
        f"missing {', '.join(missing)} (apt-get install slurm-wlm munge iproute2)"
        if missing
        else "needs root for a network namespace"
        if os.geteuid() != 0
        else ""
    )
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"real-Slurm test cannot run in CI: {reason}")
        pytest.skip(reason)


class LoopbackSlurm:
    """Start with :meth:`start`, run client commands with :meth:`run`, always :meth:`stop`."""

    def __init__(self) -> None:
        # Not under pytest's tmp folders: munged wants every folder above its socket traversable
        # by all (pytest's are 0700); removed by stop().
        self.root = Path(tempfile.mkdtemp(prefix="carft-slurm-"))
        self.root.chmod(0o755)
        self.netns = f"carft-slurm-{os.getpid()}-{secrets.token_hex(3)}"
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside an allocation must not leak it into the cluster's jobs

    # ------------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        for sub in ("etc", "munge", "state", "spool/localhost", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket directory others cannot traverse
        (self.root / "etc" / "plugstack.conf").write_text("")
        cpus = os.cpu_count() or 1
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=carfttest",
                    "SlurmctldHost=localhost",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: how long a requeued job waits before it may start again (default 120 s)
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    # Slurm's own ports: free in a namespace of our own. NoInAddrAny: listen on the node's
                    # address (127.0.0.1); binding the wildcard fails where the namespace has only loopback.
                    "SlurmctldPort=6817",
                    "SlurmdPort=6818",
                    "CommunicationParameters=NoInAddrAny",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    f"PlugStackConfig={r}/etc/plugstack.conf",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=bf_interval=1",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=1000",  # without it a job takes the whole node's memory
                    "ReturnToService=2",
                    "InactiveLimit=0",
                    "MinJobAge=600",  # keep finished jobs visible to scontrol while the test reads them
                    "KillWait=5",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _in_netns(self, command: list[str]) -> list[str]:
        # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree slurmd reads.
        return ["nsenter", f"--net=/run/netns/{self.netns}", *command]

    def start(self) -> LoopbackSlurm:
        self._write_config()
        subprocess.run(["ip", "netns", "add", self.netns], check=True, timeout=30)
        # Besides loopback, one link-local address on a veth pair that leads nowhere (no route): glibc's
        # getaddrinfo(AF_INET, AI_ADDRCONFIG), which Slurm uses, finds nothing where a namespace has
        # no IPv4 address but loopback. Ray, finding no route out, still settles on 127.0.0.1.
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "carft0", "type", "veth", "peer", "name", "carft1"],
            ["ip", "addr", "add", "169.254.77.1/32", "dev", "carft0"],
            ["ip", "link", "set", "carft0", "up"],
            ["ip", "link", "set", "carft1", "up"],
        ):
            subprocess.run(self._in_netns(command), check=True, timeout=30, capture_output=True)
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, timeout=30, capture_output=True)
        m = self.root / "munge"
        daemons = [
            [
                "munged",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
            ["slurmctld", "-f", str(self.conf)],
            ["slurmd", "-f", str(self.conf), "-N", "localhost"],
        ]
        for command in daemons:
            done = subprocess.run(self._in_netns(command), env=self.env, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"{command[0]} did not start: {done.stderr}\n{self.logs()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the node is '{state}', not idle, {START_TIMEOUT_S:.0f} s after start\n{self.logs()}")

    # ------------------------------------------------------------------ use
    def run(
        self,
        command: list[str],
        *,
        check: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run a command (a Slurm client, usually) inside the cluster's namespace."""
        done = subprocess.run(
            self._in_netns(command),
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} -> {done.returncode}: {done.stderr}")
        return done

    def pids(self) -> list[int]:
        """Every process in the namespace (the daemons and whatever the jobs left)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def job_leftovers(self) -> list[str]:
        """Command lines of the namespace's processes other than the cluster's own daemons."""
        found = []
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() in CLUSTER_DAEMONS:
                    continue
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
            except OSError:
                continue  # exited meanwhile
        return found

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text()[-3000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to everything in the namespace; then delete it."""
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", self.netns], timeout=30, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
