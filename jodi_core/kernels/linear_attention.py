"""Triton ReLU linear attention (LiteLA), token-major, deterministic.

API::

    linear_attention_triton(q, k, v, key_mask=None, eps=1e-8) -> out

Same signature and semantics as ``jodi_core.dit.attention.linear_attention``: ``q, k, v`` of shape ``(B, T, H, D)``
(any strides whose last one is 1, e.g. the three views of one qkv GEMM output), ``key_mask`` ``(B, T)`` bool with
True = the key takes part (a different mask per batch row is fine), output ``(B, T, H, D)`` contiguous in ``q.dtype``.
Per batch row and head::

    out_i = relu(q_i) . KV / (relu(q_i) . ksum + eps),   KV = sum_j relu(k_j)^T v_j (D x D),  ksum = sum_j relu(k_j)

over the keys j whose mask is True. Masked keys are never read (neither K nor V), so no padded or masked copy of K/V
is built.

``supports(q, k, v, key_mask)`` says whether the inputs are within the limits below (else the function raises
ValueError/TypeError before launching anything).

Limits: head dim D in {16, 32, 64} (Jodi and Sana use 32); dtypes float16, bfloat16, float32 (all three tensors the
same); tensors on a CUDA device, or anywhere when ``TRITON_INTERPRET=1`` (the CPU tests). Any token count T >= 0 and
batch size.

Numerics: the state KV and ksum are accumulated in float32. For 16-bit inputs the K^T V product runs on the tensor
cores with 16-bit operands and float32 accumulation; the operands are relu(K) and V exactly as stored, so every
product is exact and only the summation order differs from the float32 torch reference. For float32 inputs the state
dot runs in IEEE float32 (no TF32). The apply step computes relu(Q) . KV and the normaliser in float32 with 3xTF32
dots on the GPU (about float32 accuracy; IEEE under the interpreter) and rounds once to the output dtype.

Determinism: the token axis is split into S chunks (S depends only on B, H and T, never on the device); kernel 1
writes one float32 partial state per (batch, head, chunk) and kernel 2 sums the S partials in a fixed order. No
atomics, so repeated calls give bitwise equal results.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreter_enabled, tensors_supported

SUPPORTED_HEAD_DIMS = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_BLOCK_T = 64  # tokens per step of the state loop
_BLOCK_M = 64  # tokens per tile of the apply kernel
_MAX_M_TILES = 16  # up to 16 tiles per apply program: the S partials are summed once per up to 1024 tokens
_TARGET_STATE_PROGRAMS = 1024  # enough (batch, head, chunk) programs to fill a large GPU several times
_TARGET_APPLY_PROGRAMS = 1024


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, mask_ptr, kv_ptr, ks_ptr,
    T, H, tokens_per_split,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_mb,
    HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
):
    """One (batch*head, chunk) program: partial KV = relu(K)^T V and ksum over its chunk of tokens."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = pid_bh // H
    h = pid_bh % H
    t_begin = pid_s * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, T)

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh

    kv = tl.zeros((D, D), dtype=tl.float32)
    ks = tl.zeros((D,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + offs_t
        take = t < t_end
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + t, mask=take, other=0)
            take = take & (keep != 0)
        rows = t.to(tl.int64)[:, None]
        k = tl.load(k_base + rows * stride_kt + offs_d[None, :], mask=take[:, None], other=0.0)
        v = tl.load(v_base + rows * stride_vt + offs_d[None, :], mask=take[:, None], other=0.0)
        k = tl.where(k > 0, k, tl.zeros_like(k))  # ReLU in the input dtype: exact
        if IEEE:
            kv += tl.dot(tl.trans(k.to(tl.float32)), v.to(tl.float32), input_precision="ieee")
        else:
            kv += tl.dot(tl.trans(k), v)  # 16-bit operands, float32 accumulation
        ks += tl.sum(k.to(tl.float32), axis=0)

    part = pid_bh.to(tl.int64) * n_split + pid_s
    tl.store(kv_ptr + part * D * D + offs_d[:, None] * D + offs_d[None, :], kv)
    tl.store(ks_ptr + part * D + offs_d, ks)


@triton.jit
def _apply_kernel(
    q_ptr, kv_ptr, ks_ptr, o_ptr,
    T, H, n_split, eps,
    stride_qb, stride_qt, stride_qh,
    stride_ob, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, M_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (token block, batch*head) program: out = relu(Q) KV / (relu(Q) ksum + eps) for M_TILES * BLOCK_M tokens."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_M)

    # Sum the chunk partials in a fixed order (deterministic).
    kv = tl.zeros((D, D), dtype=tl.float32)
    ks = tl.zeros((D,), dtype=tl.float32)
    first = pid_bh.to(tl.int64) * n_split
    for s in range(n_split):
        kv += tl.load(kv_ptr + (first + s) * D * D + offs_d[:, None] * D + offs_d[None, :])
        ks += tl.load(ks_ptr + (first + s) * D + offs_d)

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
    for i in range(M_TILES):
        t = (pid_m * M_TILES + i) * BLOCK_M + offs_m
        inside = t < T
        rows = t.to(tl.int64)[:, None]
        q = tl.load(q_base + rows * stride_qt + offs_d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        q = tl.maximum(q, 0.0)
        num = tl.dot(q, kv, input_precision=PRECISION)  # (BLOCK_M, D)
        den = tl.sum(q * ks[None, :], axis=1)  # (BLOCK_M,)
        out = num / (den[:, None] + eps)
        tl.store(o_base + rows * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=inside[:, None])


def _num_splits(batch: int, heads: int, tokens: int) -> tuple[int, int]:
    """(chunks, tokens per chunk): a function of the shape alone, so results never depend on the device."""
    blocks = triton.cdiv(tokens, _BLOCK_T)
    splits = max(1, min(blocks, triton.cdiv(_TARGET_STATE_PROGRAMS, batch * heads)))
    per_split = triton.cdiv(blocks, splits) * _BLOCK_T
    return triton.cdiv(tokens, per_split), per_split


def _check_inputs(q, k, v, key_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}.")
    if q.dim() != 4:
        raise ValueError(f"q, k, v must have shape (B, T, H, D), got q of shape {tuple(q.shape)}.")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"Triton linear attention takes float16/bfloat16/float32 q, k, v of one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Triton linear attention supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}.")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError("key_mask must be a bool tensor (True = the key takes part).")
        if tuple(key_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"key_mask must have shape (B, T) = {tuple(q.shape[:2])}, got {tuple(key_mask.shape)}.")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}.")
    if not tensors_supported(q):
        raise ValueError(f"Triton linear attention needs CUDA tensors, got {q.device}.")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> bool:
    """Whether ``linear_attention_triton`` takes these inputs (so a dispatcher can route others to torch up front)."""
    try:
        _check_inputs(q, k, v, key_mask)
    except (TypeError, ValueError):
        return False
    return True


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """ReLU linear attention on Triton; see the module docstring for shapes, limits and numerics."""
    _check_inputs(q, k, v, key_mask)
    B, T, H, D = q.shape
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))

    n_split, per_split = _num_splits(B, H, T)
    kv_part = torch.empty((B * H, n_split, D, D), dtype=torch.float32, device=q.device)
    ks_part = torch.empty((B * H, n_split, D), dtype=torch.float32, device=q.device)
    if key_mask is not None:
        mask = key_mask.contiguous().view(torch.uint8)  # (B, T), 1 = keep
        stride_mb = mask.stride(0)
    else:
        mask, stride_mb = kv_part, 0  # never read (HAS_MASK=False)

    _state_kernel[(B * H, n_split)](
        k, v, mask, kv_part, ks_part,
        T, H, per_split,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_mb,
        HAS_MASK=key_mask is not None, D=D, BLOCK_T=_BLOCK_T,
        # The interpreter's 16-bit dot is wrong (Triton 3.8), so it takes the float32 path there (same products).
        IEEE=q.dtype == torch.float32 or interpreter_enabled(),
        num_warps=4,
    )
    # Enough tiles per program that the partial sums are read rarely, while keeping ~1024 programs.
    tiles = triton.cdiv(T, _BLOCK_M)
    m_tiles = min(_MAX_M_TILES, triton.next_power_of_2(max(1, tiles * B * H // _TARGET_APPLY_PROGRAMS)))
    grid = (triton.cdiv(tiles, m_tiles), B * H)
    _apply_kernel[grid](
        q, kv_part, ks_part, out,
        T, H, n_split, float(eps),
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=_BLOCK_M, M_TILES=m_tiles,
        # 3xTF32 on the tensor cores is float32-accurate here (relu(q) in 16-bit dtypes is exact in TF32).
        PRECISION="ieee" if interpreter_enabled() else "tf32x3",
        num_warps=4,
    )
    return out
