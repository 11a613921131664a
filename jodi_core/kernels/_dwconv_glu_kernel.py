"""Triton kernel of ``dwconv_glu`` (imported lazily by ``dwconv_glu.py``, which imports without Triton)."""

import triton
import triton.language as tl


@triton.jit
def silu(a, FAST: tl.constexpr):
    """SiLU in float32; FAST uses the hardware tanh (one MUFU op, ~2^-11 relative error, fine for bf16)."""
    if FAST:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [a * 0.5], dtype=tl.float32, is_pure=True, pack=1
        )
        return a * (0.5 + 0.5 * t)
    else:
        return a / (1.0 + tl.exp(-a))


@triton.jit
def silu_row(base, y, Hh, Ww, xs, c, cmask, s_h, s_w, FAST: tl.constexpr):
    """SiLU of input row y at columns xs-1, xs, xs+1 (zero outside the image): three (BLOCK_X, BLOCK_C) tiles."""
    row_ok = (y >= 0) & (y < Hh)
    ptr = base + y * s_h + c[None, :]
    xl = xs - 1
    xr = xs + 1
    ml = row_ok & (xl >= 0) & (xl < Ww)
    mm = row_ok & (xs < Ww)
    mr = row_ok & (xr < Ww)
    a = tl.load(ptr + xl[:, None] * s_w, mask=ml[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    b = tl.load(ptr + xs[:, None] * s_w, mask=mm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    d = tl.load(ptr + xr[:, None] * s_w, mask=mr[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return silu(a, FAST), silu(b, FAST), silu(d, FAST)


@triton.jit
def taps(w_ptr, c, cmask, ky):
    """Weights of kernel row ky for channels c: three (BLOCK_C,) float32 vectors."""
    p = w_ptr + c * 9 + ky * 3
    w0 = tl.load(p, mask=cmask, other=0.0).to(tl.float32)
    w1 = tl.load(p + 1, mask=cmask, other=0.0).to(tl.float32)
    w2 = tl.load(p + 2, mask=cmask, other=0.0).to(tl.float32)
    return w0, w1, w2


@triton.jit
def kernel(
    x_ptr, w_ptr, b_ptr, o_ptr,
    Hh, Ww, M,
    s_xb, s_xc, s_xh, s_xw,
    s_ob, s_oc, s_oh, s_ow,
    HAS_BIAS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr,
):
    """One program: output rows [r0, r0 + ROWS) x BLOCK_X columns x BLOCK_C channels of one image."""
    pid_c = tl.program_id(0)
    pid_x = tl.program_id(1)
    n_row_blocks = tl.cdiv(Hh, ROWS)
    b = (tl.program_id(2) // n_row_blocks).to(tl.int64)
    r0 = (tl.program_id(2) % n_row_blocks) * ROWS
    r_end = tl.minimum(r0 + ROWS, Hh)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < M
    xs = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    xmask = xs < Ww
    # Channels c (value) and c + M (gate); s_xc is 1 for channels-last x.
    base_v = x_ptr + b * s_xb
    base_g = x_ptr + b * s_xb + M * s_xc
    cv = c * s_xc
    cg = c * s_xc

    v00, v01, v02 = taps(w_ptr, c, cmask, 0)
    v10, v11, v12 = taps(w_ptr, c, cmask, 1)
    v20, v21, v22 = taps(w_ptr, c, cmask, 2)
    g00, g01, g02 = taps(w_ptr + M * 9, c, cmask, 0)
    g10, g11, g12 = taps(w_ptr + M * 9, c, cmask, 1)
    g20, g21, g22 = taps(w_ptr + M * 9, c, cmask, 2)
    if HAS_BIAS:
        bv = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bg = tl.load(b_ptr + M + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        bv = tl.zeros((BLOCK_C,), dtype=tl.float32)
        bg = tl.zeros((BLOCK_C,), dtype=tl.float32)

    zero = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
    # Walking input rows y = r0-1 .. r_end (rows outside the image read as zeros): acc_*_prev holds output row y-1,
    # acc_*_cur output row y; input row y completes output row y-1.
    acc_v_prev = zero
    acc_g_prev = zero
    acc_v_cur = zero + bv[None, :]
    acc_g_cur = zero + bg[None, :]
    o_base = o_ptr + b * s_ob + c[None, :] * s_oc + xs[:, None] * s_ow
    o_mask = xmask[:, None] & cmask[None, :]
    for y in range(r0 - 1, r_end + 1):
        l, m, r = silu_row(base_v, y, Hh, Ww, xs, cv, cmask, s_xh, s_xw, FAST)
        acc_v_prev += l * v20[None, :] + m * v21[None, :] + r * v22[None, :]  # input y is row +1 of output y-1
        acc_v_cur += l * v10[None, :] + m * v11[None, :] + r * v12[None, :]
        acc_v_next = bv[None, :] + l * v00[None, :] + m * v01[None, :] + r * v02[None, :]
        l, m, r = silu_row(base_g, y, Hh, Ww, xs, cg, cmask, s_xh, s_xw, FAST)
        acc_g_prev += l * g20[None, :] + m * g21[None, :] + r * g22[None, :]
        acc_g_cur += l * g10[None, :] + m * g11[None, :] + r * g12[None, :]
        acc_g_next = bg[None, :] + l * g00[None, :] + m * g01[None, :] + r * g02[None, :]
        # Output row y-1 is complete.
        out = acc_v_prev * silu(acc_g_prev, FAST)
        tl.store(o_base + (y - 1) * s_oh, out.to(o_ptr.dtype.element_ty), mask=o_mask & (y - 1 >= r0))
        acc_v_prev = acc_v_cur
        acc_g_prev = acc_g_cur
        acc_v_cur = acc_v_next
        acc_g_cur = acc_g_next
