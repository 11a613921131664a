"""Triton kernel of ``gate_residual`` (imported lazily by ``gate_residual.py``, which imports without Triton)."""

import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, gate_ptr, y_ptr, o_ptr, T, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = row // T
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * C + cols, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + group * C + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * C + cols, (x + g * y).to(o_ptr.dtype.element_ty), mask=inside)
