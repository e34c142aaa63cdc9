"""Slurm host lists: expand ``gpu[03-05],gpu7`` and pick the rendezvous host.

``scontrol show hostnames`` is the authority when it works (it needs a reachable Slurm
configuration, which every allocation has); outside one, or when it fails, the pure-Python
expansion below covers Slurm's hostlist syntax: comma-separated names, bracketed ranges
and lists (``n[1-3,7]``), zero padding kept from the range's start (``[009-011]``), and
several bracket groups in one name (``rack[1-2]-gpu[1-2]``, expanded left to right).
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Mapping

from carft_nemo.config import ConfigError

_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM nodelist {nodelist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"SLURM nodelist {nodelist!r}: unbalanced '['")
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_brackets(body: str, nodelist: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None:
            raise ConfigError(f"SLURM nodelist {nodelist!r}: bad range {item!r} in [{body}]")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f"SLURM nodelist {nodelist!r}: descending range {item!r}")
        width = len(lo)
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a Slurm hostlist expression, in Slurm's order."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, bracket, literal, bracket, ...
        choices = [[p] if i % 2 == 0 else _expand_brackets(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """``scontrol show hostnames`` output, or ``None`` when scontrol is missing or fails."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.stdout.split()
    return hosts or None


def first_host(env: Mapping[str, str]) -> str:
    """The job step's first host (the rendezvous master); 127.0.0.1 without a nodelist."""
    nodelist = next((env[v] for v in _NODELIST_VARS if env.get(v)), None)
    if not nodelist:
        return "127.0.0.1"
    hosts = scontrol_hostnames(nodelist) or expand_nodelist(nodelist)
    return hosts[0]


__all__ = ["expand_nodelist", "first_host", "scontrol_hostnames"]
