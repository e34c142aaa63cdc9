"""carft-nemo: CARFT (contrastive annotated-CoT reinforced fine-tuning) on megatron-core."""

import warnings as _warnings

# megatron-core warns at import and model build about fused kernels that CPU machines never
# have; they are expected there and drown the run's own output.
for _message in (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
    r"Transformer Engine is not installed",
):
    _warnings.filterwarnings("ignore", message=f".*{_message}.*")

__version__ = "0.1.0"
