"""Compatibility layer that lets megatron-core run on a CPU-only torch build (gloo).

Applied once by :func:`apply` (called from :mod:`carft_nemo.distributed.layout`); does
nothing when CUDA is present, so clusters run megatron unchanged. Each patch names the
megatron-core call sites (0.16.1; 0.19.x where noted) that need it:

1. ``torch.cuda.current_device`` -> ``"cpu"``:
   rotary_pos_embedding.py moves ``inv_freq`` to ``torch.cuda.current_device()``;
   p2p_communication.py allocates pipeline receive buffers there; tensor_parallel/layers.py.
2. ``torch.cuda.synchronize`` / ``torch.cuda.current_stream`` -> no-ops:
   p2p_communication.py synchronises after ``batch_isend_irecv``; 0.19.x
   param_and_grad_buffer.start_grad_sync waits on the current stream.
3. Megatron's model-parallel RNG tracker on the CPU generator:
   ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.fork`` (entered in every
   attention forward) read/write CUDA RNG state.
4. :class:`CudaAsCpuMode`, a ``TorchFunctionMode`` that turns ``device="cuda"`` into CPU
   and makes ``Tensor.cuda()`` a no-op: pipeline schedules (``torch.zeros(..., device="cuda")``
   token counters) are wrapped automatically; DDP / optimizer construction and
   ``optimizer.step()`` (found-inf and grad-norm scalars on "cuda"; clip_grads asserts the
   grad type string is ``torch.cuda.FloatTensor``) run under :func:`cuda_as_cpu_context`;
   so does GPTModel construction (``LanguageModule.setup_embeddings_and_output_layer`` calls
   ``weight.data.cuda()`` on the last stage's tied output weight when PP > 1).
   It also drops ``pin_memory=True`` (no pinned allocator without an accelerator):
   ``rope_utils.get_pos_emb_on_this_cp_rank`` pins the chunk indices of context parallelism.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

APPLIED: list[str] = []


def _names_cuda(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaAsCpuMode(TorchFunctionMode):
    """While active, tensors asked for on CUDA are made on the CPU (patch 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts param.grad.type() == "torch.cuda.FloatTensor"
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cuda_as_cpu_context():
    """Context for megatron calls that create tensors on "cuda" (no-op with CUDA)."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return CudaAsCpuMode()


def _wrap(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with CudaAsCpuMode():
            return fn(*args, **kwargs)

    wrapper.__carft_cpu_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


class _NullStream:
    def wait_event(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> None:
        return None


def apply() -> list[str]:
    """Install the patches once (idempotent); returns the list applied (empty on GPU)."""
    if torch.cuda.is_available() or APPLIED:
        return APPLIED
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda *a, **k: _NullStream()  # type: ignore[assignment]
    APPLIED.append("torch.cuda.current_device/synchronize/current_stream")

    from megatron.core.tensor_parallel import random as megatron_random

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    megatron_random._get_cuda_rng_state = get_state
    megatron_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.manual_seed = torch.manual_seed  # type: ignore[assignment]
    APPLIED.append("megatron RNG tracker on the CPU generator")

    from megatron.core.pipeline_parallel import schedules

    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ):
        fn = getattr(schedules, name)
        if not getattr(fn, "__carft_cpu_wrapped__", False):
            setattr(schedules, name, _wrap(fn))
    APPLIED.append("pipeline schedules under CudaAsCpuMode")
    return APPLIED


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Apply the patches and run the block under :class:`CudaAsCpuMode` (on CPU only)."""
    apply()
    with cuda_as_cpu_context():
        yield
