"""Typed configuration schemas and the YAML loader."""

from carft_nemo.config.base import ConfigError, key_prefix, load_config, require, save_resolved, to_yaml

__all__ = ["ConfigError", "key_prefix", "load_config", "require", "save_resolved", "to_yaml"]
