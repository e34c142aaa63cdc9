"""Which schema validates which YAML in ``configs/`` (by file-name prefix).

The top layer of the package: it knows every recipe's schema. ``configs/base/`` holds
fragments that only make sense inside another file's ``defaults``.
"""

from __future__ import annotations

from pathlib import Path

from carft_nemo.data.datasets import DatasetConfig
from carft_nemo.pipeline.main_job import MainConfig
from carft_nemo.pipeline.study import StudyConfig
from carft_nemo.rl.config import RLConfig
from carft_nemo.sft.config import SFTConfig

SCHEMAS_BY_KIND: dict[str, type] = {
    "sft": SFTConfig,
    "reft": RLConfig,
    "carft": RLConfig,
    "grpo": RLConfig,
    "study": StudyConfig,
    "stability": StudyConfig,  # the stability study runs the study pipeline at a collapsing setting
    "main": MainConfig,
}


def schema_for(path: str | Path) -> type:
    """The dataclass schema of a config file; raises KeyError for an unknown kind."""
    path = Path(path)
    if path.parent.name == "data":
        return DatasetConfig
    kind = path.name.split("-", 1)[0]
    if kind not in SCHEMAS_BY_KIND:
        raise KeyError(f"{path}: no schema registered for config kind {kind!r}")
    return SCHEMAS_BY_KIND[kind]


__all__ = ["SCHEMAS_BY_KIND", "schema_for"]
