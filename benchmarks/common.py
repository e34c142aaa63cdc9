"""Tiny shared helper for benchmark scripts: ``--quick`` flag, a printed table, a JSON file.

The scripts import it as ``benchmarks.common``, so run them as modules from the repository
root: ``python -m benchmarks.sandbox --quick``.

Usage::

    args = parse_args("sandbox", "what it measures", extra=lambda p: p.add_argument(...))
    print_table(rows)                        # rows: list of dicts with the same keys
    write_result(args.out, {"programs_per_s": ..., ...})   # default: benchmarks/results/sandbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(
    name: str,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Arguments every benchmark takes (``--quick``, ``--out``) plus the script's own."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small subset (< 1 min), for CI / smoke checks")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json", help="result JSON path")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """Print ``rows`` as an aligned text table (floats with 3 significant decimals)."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` plus host facts (cpus, python, time) as JSON to ``path``."""
    payload = {
        **result,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
