"""Compare the per-step metrics of two runs (or two trees of runs) with the same seed.

    python scripts/compare_metrics.py RUN_A RUN_B [--rtol 1e-6] [--atol 1e-9]

Every ``metrics.jsonl`` under RUN_A is paired with the file at the same relative path under
RUN_B; rows are matched by (stage, step, kind) and every numeric field except timings is
compared. Prints one line per file (rows, fields, largest difference) and exits 1 when a
field differs beyond the tolerance, a row or field is missing on one side, or no file was
found. This is how a refactor shows that it left training behaviour unchanged.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from carft_nemo.telemetry.run_log import read_metrics

IGNORED = ("time", "wall")  # substrings of fields that measure the machine, not the run


def _rows(path: Path) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for row in read_metrics(path):
        kind = "eval" if any(k.startswith("eval_") for k in row) else "train"
        out[(row.get("stage"), row.get("step"), kind)] = row
    return out


def compare_file(a: Path, b: Path, rtol: float, atol: float) -> tuple[list[str], int, float]:
    """Problems found, numeric fields compared, and the largest absolute difference."""
    rows_a, rows_b = _rows(a), _rows(b)
    problems = [f"row {key} only in {a}" for key in rows_a.keys() - rows_b.keys()]
    problems += [f"row {key} only in {b}" for key in rows_b.keys() - rows_a.keys()]
    compared, largest = 0, 0.0
    for key in sorted(rows_a.keys() & rows_b.keys(), key=str):
        ra, rb = rows_a[key], rows_b[key]
        for field in sorted(ra.keys() | rb.keys()):
            if any(s in field for s in IGNORED):
                continue
            if field not in ra or field not in rb:
                problems.append(f"{key} field {field!r} only on one side")
                continue
            va, vb = ra[field], rb[field]
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                if va != vb:
                    problems.append(f"{key} {field}: {va!r} != {vb!r}")
                continue
            compared += 1
            diff = abs(va - vb)
            largest = max(largest, diff) if math.isfinite(diff) else largest
            if not math.isclose(va, vb, rel_tol=rtol, abs_tol=atol):
                problems.append(f"{key} {field}: {va!r} != {vb!r} (|diff| {diff:.3g})")
    return problems, compared, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-9)
    args = parser.parse_args(argv)
    files = sorted(p.relative_to(args.run_a) for p in args.run_a.rglob("metrics.jsonl"))
    if not files:
        print(f"no metrics.jsonl under {args.run_a}", file=sys.stderr)
        return 1
    failed = False
    for rel in files:
        other = args.run_b / rel
        if not other.is_file():
            print(f"{rel}: missing under {args.run_b}")
            failed = True
            continue
        problems, compared, largest = compare_file(args.run_a / rel, other, args.rtol, args.atol)
        status = "differs" if problems else "same"
        print(f"{rel}: {status}, {compared} values compared, largest |diff| {largest:.3g}")
        for line in problems[:20]:
            print(f"    {line}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
