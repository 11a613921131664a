"""Optional Triton kernels for the Jodi DiT, the ``triton`` backend of ``jodi_core.dit.attention``.

Nothing here imports Triton at module import time: each kernel module imports it when it is itself imported, and
``jodi_core.dit.attention`` calls :func:`triton_kernels` only when a model resolves the ``triton`` backend. Every fused
op has a PyTorch function of the same signature that computes the same thing, used on CPU, without Triton, or after a
kernel fails (``jodi_core.dit.attention.run_kernel``, the one fallback policy).

Modules:
- ``linear_attention``: ReLU linear attention (LiteLA) in two deterministic kernels (state, then apply).
- ``dwconv_glu``: SiLU -> depthwise 3x3 conv -> value * SiLU(gate), the memory-bound middle of GLUMBConv.
- ``layernorm_modulate``: LayerNorm without affine fused with the adaLN ``x * (1 + scale) + shift``.
- ``gate_residual``: the gated residual ``x + gate * y`` of the DiT blocks.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)


_importable: dict[str, bool] = {}  # a plain dict cache: torch.compile traces it without warnings


def _triton_importable() -> bool:
    if "triton" not in _importable:
        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # a broken install can raise anything at import
                logger.info("Triton is installed but does not import (%r).", exc)
                ok = False
        _importable["triton"] = ok
    return _importable["triton"]


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), e.g. in the CPU tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Whether Triton kernels can run here: Triton imports, and a CUDA device or the interpreter is there.

    Cheap after the first call (cached) and never raises.
    """
    try:
        if not _triton_importable():
            return False
        if interpreter_enabled():
            return True
        return bool(torch.cuda.is_available())
    except Exception:  # never let a probe break the caller
        return False


def tensors_supported(*tensors) -> bool:
    """Whether these tensors live where the kernels can run (CUDA, or anywhere under the interpreter)."""
    if interpreter_enabled():
        return True
    return all(t.is_cuda for t in tensors)


def runs_here(*tensors) -> bool:
    """Whether the kernels can run on these tensors: Triton imports, and they are CUDA tensors (or the interpreter is
    on)."""
    return triton_available() and tensors_supported(*tensors)


# The row kernels (layernorm_modulate, gate_residual): one program per token row of C channels, one modulation vector
# per group of T rows, the whole row in one block.
ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROW_CHANNELS = 16384


def row_kernel_fits(x) -> bool:
    """Whether a row kernel takes this dtype and width."""
    return x.dtype in ROW_DTYPES and x.shape[-1] <= MAX_ROW_CHANNELS


def row_launch(x, op: str) -> tuple[int, int, int, int, int]:
    """``(groups, T, C, BLOCK_C, num_warps)`` of a row kernel over ``x (..., T, C)``; a clear error where it does not
    fit."""
    if not row_kernel_fits(x):
        raise TypeError(f"{op} takes float16/bfloat16/float32 with C <= {MAX_ROW_CHANNELS}; got {x.dtype}, "
                        f"C = {x.shape[-1]}.")
    T, C = x.shape[-2], x.shape[-1]
    groups = 1
    for n in x.shape[:-2]:
        groups *= n
    block = 1 << max(C - 1, 0).bit_length()  # next power of two
    return groups, T, C, block, 8 if block >= 2048 else 4


def triton_kernels():
    """The Triton implementations as ``jodi_core.dit.attention``'s ``triton`` backend; raises where Triton does not
    import."""
    from ..dit.attention import KernelSet
    from .dwconv_glu import dwconv_glu
    from .gate_residual import gate_residual
    from .layernorm_modulate import layernorm_modulate
    from .linear_attention import linear_attention_triton  # imports Triton

    return KernelSet(linear_attention=linear_attention_triton, layernorm_modulate=layernorm_modulate,
                     gate_residual=gate_residual, dwconv_glu=dwconv_glu, runs_on=runs_here)
