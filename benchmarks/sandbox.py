"""Sandbox throughput on ReFT's SVAMP P-CoT programs (3,043 real ``solution()`` programs).

Runs every gold program through :func:`carft_nemo.rewards.correctness.score_batch` (i.e.
the sandbox, ``max_workers`` at a time) and reports programs/s and the programs that did
not return their gold answer. ``--quick``: every 20th program.

Results are recorded in ``benchmarks/results/sandbox.json``. Run from the repository root:

    python -m benchmarks.sandbox --data ../shared/data/reft [--quick] [--workers 2]
"""

from __future__ import annotations

import time

from benchmarks.common import parse_args, print_table, write_result
from carft_nemo.data.datasets import DatasetConfig, load_examples
from carft_nemo.data.prompts import build_target
from carft_nemo.rewards.correctness import score_batch
from carft_nemo.rewards.sandbox import SandboxConfig, isolation


def main() -> None:
    args = parse_args(
        "sandbox",
        __doc__.splitlines()[0],
        extra=lambda p: (
            p.add_argument("--data", default="../shared/data/reft", help="folder with svamp_python_sdp.json"),
            p.add_argument("--workers", type=int, default=2, help="programs in parallel"),
            p.add_argument("--isolation", default="auto", help="sandbox.isolation (auto, bwrap, namespaces, process)"),
        ),
    )
    examples = load_examples(DatasetConfig(name="svamp_reft", path=args.data, cot_style="pcot"))
    if args.quick:
        examples = examples[::20]
    config = SandboxConfig(max_workers=args.workers, isolation=args.isolation)
    mode = isolation.choose(config)
    start = time.monotonic()
    results = score_batch([build_target(e) for e in examples], examples, sandbox=config)
    elapsed = time.monotonic() - start
    failures = {
        e.id: (r.failure or f"wrong value {r.value} (gold {e.answer})")
        for e, r in zip(examples, results)
        if r.reward != 1.0
    }
    row = {
        "programs": len(examples),
        "workers": args.workers,
        "isolation": mode,
        "seconds": elapsed,
        "programs_per_s": len(examples) / elapsed,
        "failures": len(failures),
    }
    print_table([row])
    for ident, why in failures.items():
        print(f"  {ident}: {why}")
    write_result(
        args.out,
        {
            **row,
            "quick": args.quick,
            "failures": failures,
            "failure_count": len(failures),
            "sandbox": {
                "timeout_s": config.timeout_s,
                "cpu_time_s": config.cpu_time_s,
                "memory_mb": config.memory_mb,
                "seccomp": config.seccomp,
                "inner_policy": config.inner_policy,
            },
        },
    )


if __name__ == "__main__":
    main()
