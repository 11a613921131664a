"""Fused adaLN input: LayerNorm without affine, then ``x * (1 + scale) + shift``.

API (same arguments for all three)::

    layernorm_modulate(x, shift, scale, eps=1e-6) -> out                   # dispatcher
    layernorm_modulate_torch(x, shift, scale, eps=1e-6) -> out             # the PyTorch definition
    layernorm_modulate_triton(x, shift, scale, eps=1e-6) -> out            # the kernel

``x (..., T, C)``; ``shift`` and ``scale`` broadcast against ``x``. The kernel handles the DiT's case, one modulation
vector per group of T tokens: ``shift, scale`` of shape ``x.shape[:-2] + (1, C)`` (any strides) in ``x.dtype``;
any other broadcast or dtype mix takes the torch path. Output in ``x.dtype``, contiguous.

The torch path runs three kernels with a 16-bit rounding after each (layer_norm, the product, the sum) and reads
and writes the (T, C) activations each time; the kernel reads ``x`` once, keeps the row statistics and the
modulation in float32 and writes once.

Limits: float16, bfloat16, float32; C up to 16384; CUDA tensors (or ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..dit.attention import run_kernel
from . import row_kernel_fits, row_launch, runs_here

_OP = "triton layernorm_modulate"


def layernorm_modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """The PyTorch definition (the reference's ``t2i_modulate(norm(x), shift, scale)``)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with a channel dimension.")
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def _grouped(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> bool:
    """True for the layout the kernel handles: one (shift, scale) row per group of T tokens."""
    if x.dim() < 2:
        return False
    want = tuple(x.shape[:-2]) + (1, x.shape[-1])
    return (
        tuple(shift.shape) == want and tuple(scale.shape) == want and shift.dtype == scale.dtype == x.dtype
    )


def _kernel():
    # The kernel module imports Triton, so it is imported on first use. (No lru_cache: dynamo would warn on it.)
    from ._layernorm_modulate_kernel import kernel

    return kernel


def layernorm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    if not _grouped(x, shift, scale):
        raise ValueError(
            f"layernorm_modulate_triton needs shift/scale of shape x.shape[:-2] + (1, C); got x {tuple(x.shape)}, "
            f"shift {tuple(shift.shape)}, scale {tuple(scale.shape)}."
        )
    groups, T, C, block, warps = row_launch(x, "layernorm_modulate_triton")
    kernel = _kernel()
    x = x.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    shift = shift.reshape(groups, C).contiguous()  # (groups, C): small
    scale = scale.reshape(groups, C).contiguous()
    kernel[(groups * T,)](x, shift, scale, out, T, C, float(eps), BLOCK_C=block, num_warps=warps)
    return out


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm + adaLN modulate on Triton where it runs and the layout fits, else in PyTorch."""
    if (
        isinstance(x, torch.Tensor)
        and row_kernel_fits(x)
        and _grouped(x, shift, scale)
        and runs_here(x)
    ):
        return run_kernel(_OP, layernorm_modulate_triton, layernorm_modulate_torch, x, shift, scale, eps)
    return layernorm_modulate_torch(x, shift, scale, eps)
