"""Typed configuration: YAML composed onto dataclass schemas, validated once at start-up.

Every component owns a small dataclass whose ``__post_init__`` checks its own fields with
:func:`require`, so a bad value fails when the config is built, before any process group,
Ray cluster or model exists. A component names its fields relative to itself (``lr``, not
``optim.lr``): the same :class:`~carft_nemo.training.optim.OptimConfig` sits at ``optim``,
``actor.optim`` and ``critic.optim``, and :func:`load_config` builds the tree bottom-up and
puts the full dotted path in front (``actor.optim.lr: must be > 0``). Checks made later, at
run time, name keys relative to their stage's config; a job that nests stages (the main job,
the study) adds the stage's section with :func:`key_prefix`.

YAML files may list ``defaults: [other.yaml, {section: component.yaml}, ...]`` (paths
relative to the file): a plain entry is merged at the top level, a ``{key: file}`` entry is
merged under ``key`` (so a component YAML such as ``data/gsm8k-ncot.yaml`` can fill
``train_data``). Defaults merge first, in order, then the file itself, then command-line
``key.sub=value`` overrides.
Unknown keys are errors (no silent typos).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key (and file)."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _load_yaml_with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain: {' -> '.join(map(str, seen))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("defaults", []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        if isinstance(parent, dict):
            for key, file in parent.items():
                sub = _load_yaml_with_defaults(path.parent / file, seen + (path,))
                merged = OmegaConf.merge(merged, OmegaConf.create({key: sub}))
        else:
            merged = OmegaConf.merge(merged, _load_yaml_with_defaults(path.parent / parent, seen + (path,)))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def _join(prefix: str, message: str) -> str:
    """``prefix.message`` (``message`` starts with its key), or ``message`` at the top level."""
    return f"{prefix}.{message}" if prefix else message


@contextlib.contextmanager
def key_prefix(prefix: str) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` of the block with its key under ``prefix``.

    For run-time checks of a stage whose config is a section of a larger one: the main job
    runs its ReFT stage inside ``key_prefix("reft")``, so ``actor.micro_batch_size: ...``
    reads ``reft.actor.micro_batch_size: ...``.
    """
    try:
        yield
    except ConfigError as err:
        raise ConfigError(_join(prefix, str(err))) from None


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _build(schema: type[T], node: DictConfig, path: str) -> T:
    """Instantiate ``schema`` from a merged node: children first, each error under its full path."""
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        value = node[f.name]
        child = _dataclass_of(hints[f.name])
        if child is not None and isinstance(value, DictConfig):
            kwargs[f.name] = _build(child, value, _join(path, f.name))
        elif isinstance(value, (DictConfig, ListConfig)):
            kwargs[f.name] = OmegaConf.to_container(value, resolve=True)
        else:
            kwargs[f.name] = value
    try:
        return schema(**kwargs)
    except ConfigError as err:  # raised by this component's own __post_init__: key relative to it
        raise ConfigError(_join(path, str(err))) from None


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).split("\n")[0]
    return f"{key}: {msg}" if key else msg


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Compose ``path`` (+ its ``defaults``) and ``overrides`` onto ``schema`` and validate.

    Returns an instance of ``schema`` (nested dataclasses instantiated, so every
    ``__post_init__`` check has run). Raises :class:`ConfigError` naming the file and the
    full dotted key.
    """
    where = str(path) if path is not None else "<defaults>"
    try:
        base = OmegaConf.structured(schema)
        layers = [base]
        if path is not None:
            layers.append(_load_yaml_with_defaults(Path(path)))
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return _build(schema, merged, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except OmegaConfBaseException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}: {cause}") from None
        raise ConfigError(f"{where}: {_describe(err)}") from None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (written next to every run's outputs)."""
    if dataclasses.is_dataclass(config):
        return OmegaConf.to_yaml(OmegaConf.structured(config))
    return OmegaConf.to_yaml(config)


def save_resolved(config: Any, path: str | Path) -> None:
    """Write the resolved config to ``path`` (atomically) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(config))
    tmp.replace(path)
