"""Fused gated residual of the DiT blocks: ``x + gate * y``.

API (same arguments for all three)::

    gate_residual(x, gate, y) -> out                    # dispatcher
    gate_residual_torch(x, gate, y) -> out              # the PyTorch definition
    gate_residual_triton(x, gate, y) -> out             # the kernel

``x, y (..., T, C)`` of one shape; ``gate`` broadcast against them. The kernel handles the DiT's case, one gate
vector per group of T tokens: ``gate`` of shape ``x.shape[:-2] + (1, C)`` (any strides), all three in one dtype; any
other broadcast or dtype mix takes the torch path. Output in ``x.dtype``, contiguous.

Why: eager PyTorch runs ``gate * y`` as a broadcasting kernel (slow, not vectorised) and then the add, moving the
(T, C) activations five times; the kernel reads x and y once and writes once, in float32 with one rounding.

Limits: float16, bfloat16, float32; C up to 16384; CUDA tensors (or ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations


import torch

from ..dit.attention import run_kernel
from . import row_kernel_fits, row_launch, runs_here

_OP = "triton gate_residual"


def gate_residual_torch(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition (the reference's ``x + gate * y``)."""
    return x + gate * y


def _grouped(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dim() < 2 or y.shape != x.shape:
        return False
    want = tuple(x.shape[:-2]) + (1, x.shape[-1])
    return tuple(gate.shape) == want and gate.dtype == y.dtype == x.dtype


def _kernel():
    # The kernel module imports Triton, so it is imported on first use. (No lru_cache: dynamo would warn on it.)
    from ._gate_residual_kernel import kernel

    return kernel


def gate_residual_triton(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not _grouped(x, gate, y):
        raise ValueError(
            f"gate_residual_triton needs x and y of one shape and gate of shape x.shape[:-2] + (1, C), one dtype; got "
            f"x {tuple(x.shape)}, gate {tuple(gate.shape)}, y {tuple(y.shape)}."
        )
    groups, T, C, block, warps = row_launch(x, "gate_residual_triton")
    kernel = _kernel()
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    gate = gate.reshape(groups, C).contiguous()  # (groups, C): small
    kernel[(groups * T,)](x, gate, y, out, T, C, BLOCK_C=block, num_warps=warps)
    return out


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` on Triton where it runs and the layout fits, else in PyTorch."""
    if (
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and row_kernel_fits(x)
        and _grouped(x, gate, y)
        and runs_here(x, y)
    ):
        return run_kernel(_OP, gate_residual_triton, gate_residual_torch, x, gate, y)
    return gate_residual_torch(x, gate, y)
