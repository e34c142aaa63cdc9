"""Every difference between the megatron-core versions we support, in one place.

Supported: 0.16.1 (newest on Python 3.11, the CPU development machines) through 0.19.x
(NGC containers on GPU clusters). Callers use these helpers, never version checks.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache
from typing import Any

from packaging.version import Version

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Apex is not installed" etc.: expected on CPU
    import megatron.core as megatron_core
    from megatron.core.models.gpt import gpt_layer_specs

MEGATRON_VERSION = Version(megatron_core.__version__)
MIN_MEGATRON = Version("0.16.1")

if MEGATRON_VERSION < MIN_MEGATRON:
    raise ImportError(f"carft-nemo needs megatron-core >= {MIN_MEGATRON}, found {MEGATRON_VERSION}")


@lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """TE imports only on GPU builds; a broken TE install must not break CPU runs."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def gpt_layer_spec(use_transformer_engine: bool, qk_layernorm: bool = False):
    """Layer spec: TE fused modules on GPU when TE imports, megatron's local modules otherwise."""
    if use_transformer_engine:
        fn = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        return fn(**_accepted(fn, {"qk_layernorm": qk_layernorm}))
    fn = gpt_layer_specs.get_gpt_layer_local_spec
    return fn(**_accepted(fn, {"qk_layernorm": qk_layernorm, "normalization": "RMSNorm"}))


def initialize_model_parallel(**kwargs: Any) -> None:
    """``parallel_state.initialize_model_parallel`` with arguments a version lacks dropped."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(**_accepted(parallel_state.initialize_model_parallel, kwargs))


def transformer_config_fields() -> set[str]:
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def optimizer_sharded_state_dict(optimizer: Any, model_sharded_state_dict: dict, *, is_loading: bool) -> dict:
    """``optimizer.sharded_state_dict`` in a layout that reshards across TP/PP/DP.

    The distributed optimizer's default (``fully_sharded_model_space``) is deprecated in
    newer releases; ``fully_reshardable`` is accepted by 0.16.1 through 0.19.x and stores
    Adam moments per model parameter, as the plain optimizer does. Older signatures took a
    ``sharding_type`` argument instead of ``metadata``.
    """
    kwargs: dict[str, Any] = {"is_loading": is_loading}
    params = inspect.signature(optimizer.sharded_state_dict).parameters
    if "metadata" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["metadata"] = {"distrib_optim_sharding_type": "fully_reshardable"}
    return optimizer.sharded_state_dict(model_sharded_state_dict, **kwargs)
