"""A bad value in a reused component is reported under its full dotted key, wherever it sits.

Components name their fields relative to themselves; :func:`load_config` prefixes the path.
Every component type that appears at more than one place in the recipes' schemas is found
here automatically and needs an entry in ``BAD`` (a field and a value it rejects), so a new
reused component cannot slip past this test.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import defaultdict
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, key_prefix, load_config
from carft_nemo.config.base import _dataclass_of
from carft_nemo.schemas import SCHEMAS_BY_KIND

ROOT = Path(__file__).resolve().parents[3]
BAD: dict[str, tuple[str, str]] = {
    "ActorConfig": ("num_workers", "0"),
    "ClusterConfig": ("gpus_per_node", "0"),
    "ContrastiveConfig": ("tau", "0.0"),
    "CollapseGuardConfig": ("lr_factor", "0"),
    "CriticConfig": ("value_clip", "0"),
    "DatasetConfig": ("split", "dev"),
    "EncodingConfig": ("max_prompt_tokens", "0"),
    "GenerationConfig": ("temperature", "0.0"),
    "LoggingConfig": ("progress_interval_s", "0"),
    "ModelConfig": ("preset", "gpt5"),
    "OptimConfig": ("lr", "-1"),
    "PackingConfig": ("max_tokens", "-1"),
    "ParallelConfig": ("tensor_parallel", "0"),
    "RLConfig": ("output_dir", "''"),
    "RLLoopConfig": ("gamma", "2.0"),
    "ReferenceConfig": ("mode", "bogus"),
    "RewardServerConfig": ("tolerance", "-1"),
    "SFTConfig": ("output_dir", "''"),
    "SFTLoopConfig": ("vote_k", "0"),
    "SandboxConfig": ("timeout_s", "0"),
    "SyntheticConfig": ("distractor_prob", "1.5"),
    "TokenizerConfig": ("kind", "sentencepiece"),
    "WandbConfig": ("mode", "cloud"),
}


def _places(schema: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted path, component type) of every nested config dataclass under ``schema``."""
    out = []
    for f in dataclasses.fields(schema):
        child = _dataclass_of(typing.get_type_hints(schema)[f.name])
        if child is not None:
            path = f"{prefix}{f.name}"
            out.append((path, child))
            out += _places(child, path + ".")
    return out


def _reused() -> dict[type, list[tuple[type, str]]]:
    """Component type -> [(top-level schema, path)] for types found at more than one place."""
    where: dict[type, list[tuple[type, str]]] = defaultdict(list)
    for schema in set(SCHEMAS_BY_KIND.values()):
        for path, kind in _places(schema):
            where[kind].append((schema, path))
    return {kind: places for kind, places in where.items() if len(places) > 1}


CASES = [(kind, schema, path) for kind, places in _reused().items() for schema, path in places]


def test_every_reused_component_has_a_bad_value_here() -> None:
    missing = sorted(kind.__name__ for kind in _reused() if kind.__name__ not in BAD)
    assert not missing, f"add a (field, rejected value) for {missing} to BAD"
    assert len(CASES) > 40  # optim, parallel, data, ... at every role of every recipe


@pytest.mark.parametrize("kind, schema, path", CASES, ids=[f"{s.__name__}:{p}" for _, s, p in CASES])
def test_error_names_the_full_dotted_key(kind: type, schema: type, path: str) -> None:
    field, value = BAD[kind.__name__]
    with pytest.raises(ConfigError) as err:
        load_config(schema, None, [f"{path}.{field}={value}"])
    assert str(err.value).startswith(f"<defaults>: {path}.{field}: "), str(err.value)


def test_a_yaml_file_and_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^\S+main-quick\.yaml: reft\.critic\.parallel\.tensor_parallel: must be"):
        load_config(
            SCHEMAS_BY_KIND["main"], ROOT / "configs" / "main-quick.yaml", ["reft.critic.parallel.tensor_parallel=0"]
        )


def test_run_time_checks_of_a_nested_stage_get_its_section() -> None:
    with pytest.raises(ConfigError, match=r"^carft\.actor\.micro_batch_size: the rollout"):
        with key_prefix("carft"):
            raise ConfigError("actor.micro_batch_size: the rollout of 10 samples must split")
