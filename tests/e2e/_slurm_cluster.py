"""A real Slurm cluster (munged, slurmctld, slurmd per node), each node in a network namespace.

One node (:class:`LoopbackSlurm`): the namespace has loopback and a veth pair that routes
nowhere, so the daemons, the job's Ray head (whose ``ray start`` swaps 127.0.0.1 for a routable
address unless there is none) and every worker talk over 127.0.0.1.

Two nodes (``LoopbackSlurm(nodes=2)``): ``node1`` and ``node2`` each in a namespace of their
own, joined by one veth pair with link-local addresses (169.254.88.1 and .2; never a private or
public range) and a default route over it, so that each node finds "the interface that routes
off the node" as on a cluster; the peer namespace forwards nothing, so nothing leaves the pair.
slurmctld and munged run on ``node1`` (munge's socket is a file, reachable from both).

Each cluster gets namespaces of its own, so Slurm's fixed ports never collide with another test
run on the host. Needs root, Debian's ``slurm-wlm`` and ``munge``, ``ip`` (iproute2) and
``nsenter`` (util-linux).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TOOLS = ("munged", "slurmctld", "slurmd", "mungekey", "sbatch", "scancel", "sinfo", "scontrol", "ip", "nsenter")
START_TIMEOUT_S = 30.0
CLUSTER_DAEMONS = frozenset({"munged", "slurmctld", "slurmscriptd", "slurmd"})  # slurmscriptd: slurmctld's helper


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


LINK_LOCAL_PREFIX = "169.254.88."  # two-node clusters: node i has LINK_LOCAL_PREFIX + str(i)


class LoopbackSlurm:
    """Start with :meth:`start`, run client commands with :meth:`run`, always :meth:`stop`.

    ``nodes``: 1 (``localhost`` on 127.0.0.1) or 2 (``node1``, ``node2`` on a veth link).
    Client commands run on the first node, as on a login node that is also the controller.
    """

    def __init__(self, nodes: int = 1) -> None:
        if nodes not in (1, 2):
            raise ValueError(f"nodes must be 1 or 2, got {nodes}")
        # Not under pytest's tmp folders: munged wants every folder above its socket traversable
        # by all (pytest's are 0700); removed by stop().
        self.root = Path(tempfile.mkdtemp(prefix="carft-slurm-"))
        self.root.chmod(0o755)
        tag = f"carft-slurm-{os.getpid()}-{secrets.token_hex(3)}"
        self.node_names = ["localhost"] if nodes == 1 else [f"node{i + 1}" for i in range(nodes)]
        self.addresses = ["127.0.0.1"] if nodes == 1 else [f"{LINK_LOCAL_PREFIX}{i + 1}" for i in range(nodes)]
        self.namespaces = [tag] if nodes == 1 else [f"{tag}-{name}" for name in self.node_names]
        self.netns = self.namespaces[0]  # where slurmctld, munged and the client commands run
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside an allocation must not leak it into the cluster's jobs
        if nodes > 1:  # the tests' own loopback settings (tests/conftest.py) would cut the nodes apart
            for key in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR"):
                self.env.pop(key, None)

    # ------------------------------------------------------------------ set-up
    def _write_config(self) -> None:
        for sub in ("etc", "munge", "state", "log", "run", *(f"spool/{name}" for name in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket directory others cannot traverse
        (self.root / "etc" / "plugstack.conf").write_text("")
        cpus = os.cpu_count() or 1
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=carfttest",
                    # slurmctld accepts "localhost" or this host's own name: every node shares the host's.
                    f"SlurmctldHost={self._controller_name()}({self.addresses[0]})",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: how long a requeued job waits before it may start again (default 120 s)
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    # Slurm's own ports: free in namespaces of our own. One node: NoInAddrAny, listen on
                    # the host name's address (127.0.0.1; binding the wildcard fails where a namespace has
                    # only loopback). Two nodes: the wildcard, since the host name resolves to loopback.
                    "SlurmctldPort=6817",
                    "SlurmdPort=6818",
                    *(["CommunicationParameters=NoInAddrAny"] if len(self.node_names) == 1 else []),
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd-%n.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd-%n.log",
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
                    *(
                        f"NodeName={name} NodeAddr={address} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
                        for name, address in zip(self.node_names, self.addresses)
                    ),
                    f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _controller_name(self) -> str:
        return "localhost" if len(self.node_names) == 1 else socket.gethostname().split(".")[0]

    def _in_netns(self, command: list[str], node: int = 0) -> list[str]:
        # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree slurmd reads.
        return ["nsenter", f"--net=/run/netns/{self.namespaces[node]}", *command]

    def _network(self) -> list[list[str]]:
        """``ip`` commands (run in the first namespace) wiring the nodes' namespaces."""
        if len(self.namespaces) == 1:
            # Besides loopback, one link-local address on a veth pair that leads nowhere (no route):
            # glibc's getaddrinfo(AF_INET, AI_ADDRCONFIG), which Slurm uses, finds nothing where a
            # namespace has no IPv4 address but loopback. Ray, finding no route out, settles on 127.0.0.1.
            return [
                ["ip", "link", "add", "carft0", "type", "veth", "peer", "name", "carft1"],
                ["ip", "addr", "add", "169.254.77.1/32", "dev", "carft0"],
                ["ip", "link", "set", "carft0", "up"],
                ["ip", "link", "set", "carft1", "up"],
            ]
        peer = self.namespaces[1]
        return [
            ["ip", "link", "add", "carft0", "type", "veth", "peer", "name", "carft1", "netns", peer],
            ["ip", "addr", "add", f"{self.addresses[0]}/24", "dev", "carft0"],
            ["ip", "link", "set", "carft0", "up"],
            ["ip", "route", "add", "default", "dev", "carft0"],
            ["ip", "-n", self.namespaces[1], "link", "set", "lo", "up"],
            ["ip", "-n", self.namespaces[1], "addr", "add", f"{self.addresses[1]}/24", "dev", "carft1"],
            ["ip", "-n", self.namespaces[1], "link", "set", "carft1", "up"],
            ["ip", "-n", self.namespaces[1], "route", "add", "default", "dev", "carft1"],
        ]

    def start(self) -> LoopbackSlurm:
        self._write_config()
        for netns in self.namespaces:
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
        for command in (["ip", "link", "set", "lo", "up"], *self._network()):
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
        ]
        nodes = [(0, command) for command in daemons] + [
            (i, ["slurmd", "-f", str(self.conf), "-N", name]) for i, name in enumerate(self.node_names)
        ]
        for node, command in nodes:
            done = subprocess.run(
                self._in_netns(command, node), env=self.env, capture_output=True, text=True, timeout=30
            )
            if done.returncode != 0:
                raise RuntimeError(f"{command[0]} did not start: {done.stderr}\n{self.logs()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10).stdout.split()
            if states == ["idle"] * len(self.node_names):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the nodes are {states}, not idle, {START_TIMEOUT_S:.0f} s after start\n{self.logs()}")

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

    def pids(self, node: int | None = None) -> list[int]:
        """Every process in a node's namespace (all nodes' by default): the daemons and what jobs left."""
        pids = []
        for netns in self.namespaces if node is None else [self.namespaces[node]]:
            out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
            pids += [int(p) for p in out.stdout.split()]
        return pids

    def job_processes(self, node: int | None = None, *, keep: frozenset[str] = CLUSTER_DAEMONS) -> dict[int, str]:
        """pid -> command line of a node's (every node's) processes but the ``keep`` kinds (the daemons)."""
        found = {}
        for pid in self.pids(node):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() in keep:
                    continue
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                continue  # exited meanwhile
        return found

    def job_leftovers(self, node: int | None = None) -> list[str]:
        """Command lines of a node's (every node's) processes other than the cluster's own daemons."""
        return list(self.job_processes(node).values())

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
        for netns in self.namespaces:
            subprocess.run(["ip", "netns", "del", netns], timeout=30, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def remains(self) -> list[str]:
        """What of the cluster outlived :meth:`stop`: its namespaces, processes naming its folder, the folder."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split()
        left = [f"namespace {netns}" for netns in self.namespaces if netns in listed]
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(self.root).encode() in (proc / "cmdline").read_bytes():
                    left.append(f"process {proc.name}: {(proc / 'comm').read_text().strip()}")
            except OSError:
                continue  # exited meanwhile
        return left + ([f"folder {self.root}"] if self.root.exists() else [])
