"""Checkpoints: HF Llama/Qwen2 <-> megatron conversion and atomic, reshardable training checkpoints."""

from carft_nemo.checkpoint.dist_checkpoint import (
    CheckpointError,
    CheckpointInfo,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from carft_nemo.checkpoint.hf_config import HFConversionError
from carft_nemo.checkpoint.hf_io import export_hf, hf_model_config, import_hf

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "HFConversionError",
    "export_hf",
    "find_latest_checkpoint",
    "hf_model_config",
    "import_hf",
    "load_checkpoint",
    "save_checkpoint",
]
