"""Which schema validates which YAML in ``configs/`` (by file-name prefix).

``configs/base/`` holds fragments that only make sense inside another file's ``defaults``.
"""

from __future__ import annotations

from pathlib import Path


def schema_for(path: str | Path) -> type:
    """The dataclass schema of a config file; raises KeyError for an unknown kind."""
    path = Path(path)
    if path.parent.name == "data":
        from carft_nemo.data.datasets import DatasetConfig

        return DatasetConfig
    kind = path.name.split("-", 1)[0]
    if kind == "sft":
        from carft_nemo.training.sft import SFTConfig

        return SFTConfig
    if kind in ("reft", "carft", "grpo"):
        from carft_nemo.rl.config import RLConfig

        return RLConfig
    if kind == "study":
        from carft_nemo.pipeline.study import StudyConfig

        return StudyConfig
    if kind == "main":
        from carft_nemo.pipeline.main_job import MainConfig

        return MainConfig
    raise KeyError(f"{path}: no schema registered for config kind {kind!r}")
