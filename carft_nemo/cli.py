"""Command-line front of the recipes: ``--config FILE key.sub=value ...`` and clean errors.

User mistakes (a bad key or value, a missing or malformed data file, an incompatible
checkpoint) end with one line naming the problem and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from carft_nemo.config import ConfigError, load_config

T = TypeVar("T")
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def parse(schema: type[T], description: str, argv: Sequence[str] | None = None, default_config: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML file (may list 'defaults')")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 parallel.tensor_parallel=2")
    args = parser.parse_args(argv)
    return guarded(lambda: load_config(schema, args.config, args.overrides))


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; user errors print ``error: ...`` and exit 2, a failed worker exits 1."""
    from carft_nemo.checkpoint.dist_checkpoint import CheckpointError
    from carft_nemo.data.datasets import DataError
    from carft_nemo.distributed.ray_group import WorkerFailure

    try:
        return fn()
    except (*USER_ERRORS, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except WorkerFailure as err:  # a worker died or hung: the run stopped, its last checkpoint stands
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
