"""Fused middle of GLUMBConv: SiLU -> depthwise 3x3 conv (zero padding 1) -> value * SiLU(gate).

API (both functions take and return the same things)::

    dwconv_glu(x, weight, bias) -> out                      # dispatcher
    dwconv_glu_torch(x, weight, bias) -> out                # the PyTorch definition

``x (B, 2M, h, w)``: the inverted 1x1 conv's output *before* its SiLU; ``weight (2M, 1, 3, 3)`` and ``bias (2M,)`` or
None: the depthwise conv's parameters; ``out (B, M, h, w)`` in ``x.dtype`` =
``value * silu(gate)`` with ``[value, gate] = dwconv(silu(x)).chunk(2, dim=1)``.

Why fuse (see benchmarks/README.md): at 1024 px with CFG the GLUMBConv hidden tensor is 16K tokens x 11200 channels,
367 MB in bf16. The unfused chain reads and writes it three times (SiLU, depthwise conv, GLU); the kernel reads ``x``
once and writes only the 183 MB result.

Kernel: one program per (channel block, column block, batch row, block of output rows) walks down its rows (plus
one halo row above and below); each input row is loaded
once per horizontal tap (the shifted loads hit the cache), passed through SiLU in float32 and added to the
accumulators of the three output rows it touches, so only two output rows per half are live. Float32 throughout
(for bfloat16 the SiLUs use the hardware tanh, relative error ~2^-11, below bf16's 2^-8 rounding), one rounding at
the store (the torch path rounds after each op in 16-bit dtypes). Channels-last ``x`` (the layout
the DiT produces) is read without a copy; the output is channels-last.

Limits: float16, bfloat16, float32; CUDA tensors (or ``TRITON_INTERPRET=1``); a 3x3 depthwise kernel; one
image (2M x h x w) under 2**31 elements.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dit.attention import run_kernel
from . import interpreter_enabled, runs_here

_OP = "triton dwconv_glu"
_BLOCK_X = 8  # tuned on an H100 at the joint-generation size (benchmarks/README.md)
_BLOCK_C = 128
_ROWS = 32
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dwconv_glu_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The PyTorch definition (the op sequence of the reference GLUMBConv)."""
    _check(x, weight, bias)
    z = F.conv2d(F.silu(x), weight, bias, padding=1, groups=x.shape[1])
    value, gate = z.chunk(2, dim=1)
    return value * F.silu(gate)


def _check(x, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must have shape (B, 2M, h, w), got {getattr(x, 'shape', type(x).__name__)}.")
    C2 = x.shape[1]
    if C2 % 2:
        raise ValueError(f"x must have an even channel count (value and gate halves), got {C2}.")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C2, 1, 3, 3):
        raise ValueError(f"weight must have shape ({C2}, 1, 3, 3), got {getattr(weight, 'shape', None)}.")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (C2,)):
        raise ValueError(f"bias must have shape ({C2},) or be None, got {getattr(bias, 'shape', None)}.")


def _kernel():
    # The kernel module imports Triton, so it is imported on first use. (No lru_cache: dynamo would warn on it.)
    import triton

    from ._dwconv_glu_kernel import kernel

    return triton, kernel


def dwconv_glu_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, block_x: int = _BLOCK_X,
    block_c: int = _BLOCK_C, rows: int = _ROWS, num_warps: int = 4,
) -> torch.Tensor:
    """The Triton kernel (no fallback; ``dwconv_glu`` adds one). The keywords are tuning knobs (powers of two)."""
    _check(x, weight, bias)
    if x.dtype not in _DTYPES:
        raise TypeError(f"dwconv_glu_triton takes float16/bfloat16/float32, got {x.dtype}.")
    triton, kernel = _kernel()
    B, C2, H, W = x.shape
    M = C2 // 2
    x = x.contiguous(memory_format=torch.channels_last)  # no copy for the DiT's layout
    out = torch.empty((B, M, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    w = weight.detach().reshape(C2, 9).contiguous()
    b = bias.detach().contiguous() if bias is not None else w
    rows = max(rows, triton.cdiv(B * H, 65535))  # the grid's third axis is limited to 65535
    grid = (triton.cdiv(M, block_c), triton.cdiv(W, block_x), B * triton.cdiv(H, rows))
    kernel[grid](
        x, w, b, out,
        H, W, M,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        HAS_BIAS=bias is not None, BLOCK_X=block_x, BLOCK_C=block_c, ROWS=rows,
        # bfloat16 output: the hardware tanh's 2^-11 error is far below the 2^-8 rounding of the result.
        FAST=x.dtype == torch.bfloat16 and not interpreter_enabled(),
        num_warps=num_warps,
    )
    return out


def dwconv_glu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """SiLU -> depthwise 3x3 -> GLU on Triton where it runs, else in PyTorch; a failing kernel warns once."""
    if x.dtype in _DTYPES and runs_here(x):
        return run_kernel(_OP, dwconv_glu_triton, dwconv_glu_torch, x, weight, bias)
    return dwconv_glu_torch(x, weight, bias)
