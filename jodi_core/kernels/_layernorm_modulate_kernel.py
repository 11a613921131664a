"""Triton kernel of ``layernorm_modulate`` (imported lazily by ``layernorm_modulate.py``, importable without it)."""

import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, shift_ptr, scale_ptr, o_ptr, T, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = row // T
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(inside, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / C
    normed = centered * tl.rsqrt(var + eps)
    shift = tl.load(shift_ptr + group * C + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + group * C + cols, mask=inside, other=0.0).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(o_ptr + row * C + cols, out.to(o_ptr.dtype.element_ty), mask=inside)
