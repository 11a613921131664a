"""Building blocks of the Jodi DiT (a Sana-style linear DiT run jointly over 8 domains).

Attribute names follow the official state-dict keys, so checkpoints load with ``strict=True``. Every module takes
``dtype``, ``device`` and ``operations`` like ComfyUI's ``comfy/ldm`` models; ``operations`` defaults to ``torch.nn``
and lets a host inject its own Linear/Conv2d/Embedding (weight casting, skipped init).

Tensor layout inside the blocks: ``x (N, L, T, C)`` with N rows, L domains, T = h*w tokens per domain (row-major)
and C hidden channels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TORCH, AttentionBackend

_LN_EPS = 1e-6  # adaLN LayerNorms (no affine)
_RMS_EPS = 1e-5  # caption RMSNorm
CAPTION_MASK_BIAS = -10000.0  # additive bias of padded caption tokens, as the reference's non-xformers path
TIMESTEP_FREQ_DIM = 256


# The fused ops come from the model's attention backend (``AttentionBackend.fused_ops``): kernels on CUDA tensors,
# else the plain torch code below; a kernel that cannot run falls back to its own torch definition.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, attention: AttentionBackend = TORCH):
    """adaLN: LayerNorm without affine, then ``x * (1 + scale) + shift`` (broadcast over tokens)."""
    fused = attention.fused_ops(x)
    if fused is not None:
        return fused.layernorm_modulate(x, shift, scale, _LN_EPS)
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=_LN_EPS), 1 + scale)  # one pass, not two


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, attention: AttentionBackend = TORCH):
    """``x + gate * y`` with ``gate`` broadcast over tokens."""
    fused = attention.fused_ops(x)
    if fused is not None:
        return fused.gate_residual(x, gate, y)
    return torch.addcmul(x, gate, y)  # one pass, not two


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features ``(N, dim)`` in float32, cosine half first (the DiT/Sana convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, pe_interpolation: float = 1.0) -> torch.Tensor:
    """2-D sincos positional embedding ``(h*w, dim)`` in float64 for an h x w token grid.

    Each axis is stretched to span ``[0, base_size)`` (so non-square grids keep the same range on both axes).
    Channels are ``[sin(w), cos(w), sin(h), cos(h)]``: the column coordinate comes first, as in the reference.
    Positions are computed in float32 and the trigonometry in float64, matching the reference's numpy code.
    """
    if dim % 4:
        raise ValueError(f"The positional embedding needs hidden_size divisible by 4, got {dim}.")
    pos_h = torch.arange(h, dtype=torch.float32) / (h / base_size) / pe_interpolation
    pos_w = torch.arange(w, dtype=torch.float32) / (w / base_size) / pe_interpolation
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double()[:, None] * omega[None]  # (n, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (n, dim/2)

    emb_w = axis(pos_w)[None, :, :].expand(h, w, dim // 2)
    emb_h = axis(pos_h)[:, None, :].expand(h, w, dim // 2)
    return torch.cat([emb_w, emb_h], dim=-1).reshape(h * w, dim)


class RMSNorm(nn.Module):
    """RMSNorm whose statistics are computed in float32; the weight starts at ``scale_factor`` (learned)."""

    def __init__(self, dim: int, scale_factor: float = 1.0, eps: float = _RMS_EPS, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), float(scale_factor), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class RoleEmbedding(nn.Module):
    """Lookup table of the role embeddings (a plain parameter: an nn.Embedding would initialise itself)."""

    def __init__(self, num_roles: int, dim: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_roles, dim, dtype=dtype, device=device))

    def forward(self, role: torch.Tensor) -> torch.Tensor:
        return F.embedding(role, self.weight)


class PatchEmbed(nn.Module):
    """Per-domain patch embedding: a ``patch x patch`` conv with stride ``patch`` (a 1x1 conv for the real model)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Conv2d(
            in_channels, hidden_size, patch_size, stride=patch_size, bias=True, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, h, w) -> (N, h*w, C)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.mlp = nn.Sequential(
            operations.Linear(TIMESTEP_FREQ_DIM, hidden_size, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(dtype))


class CaptionMlp(nn.Module):
    """The caption projection ``fc1 -> GELU(tanh) -> fc2``."""

    def __init__(self, in_features: int, hidden_size: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(in_features, hidden_size, bias=True, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption projection plus the learned null caption ``y_embedding`` (a persistent buffer, in the checkpoint)."""

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int, dtype=None, device=None,
                 operations=nn):
        super().__init__()
        self.y_proj = CaptionMlp(caption_channels, hidden_size, dtype=dtype, device=device, operations=operations)
        self.register_buffer("y_embedding", torch.empty(max_length, caption_channels, dtype=dtype, device=device))

    def forward(self, y: torch.Tensor, drop: Optional[torch.Tensor]) -> torch.Tensor:
        """``y (N, S, Cc)``; rows where ``drop`` holds take the null caption."""
        if drop is not None:
            y = torch.where(drop[:, None, None], self.y_embedding.to(y.dtype)[None], y)
        return self.y_proj(y)


class LinearSelfAttention(nn.Module):
    """LiteLA: ReLU linear attention with heads of ``head_dim`` channels over the joint token sequence."""

    def __init__(self, hidden_size: int, head_dim: int, eps: float = 1e-8, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = hidden_size // head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = operations.Linear(hidden_size, 3 * hidden_size, bias=False, dtype=dtype, device=device)
        self.proj = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], attention: AttentionBackend = TORCH):
        N, T, C = x.shape
        # qkv output is contiguous [q | k | v]; channel c of each belongs to head c // head_dim.
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, self.head_dim).unbind(2)  # 3 x (N, T, H, D) views
        out = attention.linear_attention(q, k, v, key_mask, self.eps)
        return self.proj(out.reshape(N, T, C))


class CrossAttention(nn.Module):
    """Softmax multi-head cross-attention from image tokens to caption tokens (no norm, no gate before it)."""

    def __init__(self, hidden_size: int, num_heads: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_linear = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device)
        self.proj = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def caption_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y (N, S, C)`` -> K, V of shape ``(N, heads, S, head_dim)``; constant over a sampling run."""
        N, S, _ = y.shape
        k, v = self.kv_linear(y).view(N, S, 2, self.num_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: Optional[torch.Tensor]):
        """``x (N, T, C)``; ``bias`` is None or an additive ``(N, 1, 1, S)`` mask bias."""
        N, T, C = x.shape
        q = self.q_linear(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)  # (N, heads, T, hd)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(N, T, C))


class ConvLayer(nn.Module):
    """A conv wrapper so that keys read ``<name>.conv.weight`` as in the reference."""

    def pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply a 1x1 conv to token-major ``x (..., C_in)`` -> ``(..., C_out)``.

        A plain torch conv runs as a Linear: one GEMM with the bias in its epilogue (cuDNN adds a conv bias in a
        separate broadcast pass, ~0.5 ms per block at 1024 px). Host-provided conv classes (e.g. ComfyUI ops that
        cast weights in their forward) keep their own forward.
        """
        conv = self.conv
        if type(conv) is nn.Conv2d:
            return F.linear(x, conv.weight.flatten(1), conv.bias)
        if hasattr(conv, "pointwise_linear"):  # jodi_core.ops.CastOps: cast (or fp8) weights, still one GEMM
            return conv.pointwise_linear(x)
        lead = x.shape[:-1]
        out = conv(x.reshape(-1, 1, 1, x.shape[-1]).permute(0, 3, 1, 2))  # (M, C_in, 1, 1)
        return out.reshape(*lead, -1)

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, groups: int = 1, bias: bool = True, dtype=None,
                 device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(
            in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=bias, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GLUMBConv(nn.Module):
    """Gated inverted-bottleneck conv MLP: 1x1 (C->2H) + SiLU, depthwise 3x3, value * SiLU(gate), 1x1 (H->C)."""

    def __init__(self, hidden_size: int, mlp_hidden: int, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.inverted_conv = ConvLayer(hidden_size, 2 * mlp_hidden, 1, **kw)
        self.depth_conv = ConvLayer(2 * mlp_hidden, 2 * mlp_hidden, 3, groups=2 * mlp_hidden, **kw)
        self.point_conv = ConvLayer(mlp_hidden, hidden_size, 1, bias=False, **kw)

    def forward(self, x: torch.Tensor, h: int, w: int, attention: AttentionBackend = TORCH) -> torch.Tensor:
        """``x (B, h*w, C)`` with one image per row (a row is one domain of one sample) -> ``(B, h*w, C)``.

        The 1x1 convs run token-major and the 3x3 conv sees a channels-last view, so no layout copy is made; the 3x3
        conv pads at each domain's own border because every domain is its own batch row.
        """
        B, T, C = x.shape
        z = self.inverted_conv.pointwise(x)  # (B, T, 2H)
        z = z.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, 2H, h, w), channels-last memory: no copy
        fused = attention.fused_ops(z)
        if fused is not None:  # SiLU -> depthwise 3x3 -> GLU in one pass over the 2H-channel tensor
            z = fused.dwconv_glu(z, self.depth_conv.conv.weight, self.depth_conv.conv.bias)
        else:
            value, gate = self.depth_conv(F.silu(z, inplace=True)).chunk(2, dim=1)
            z = F.silu(gate).mul_(value)
        z = z.permute(0, 2, 3, 1).reshape(B, T, -1)  # (B, T, H); a view when z is channels-last
        return self.point_conv.pointwise(z)


class JodiBlock(nn.Module):
    """One DiT block over all domains: joint linear self-attention, cross-attention, per-domain GLUMBConv."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, head_dim: int, dtype=None, device=None,
                 operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden_size, dtype=dtype, device=device))
        self.attn = LinearSelfAttention(hidden_size, head_dim, **kw)
        self.cross_attn = CrossAttention(hidden_size, num_heads, **kw)
        self.mlp = GLUMBConv(hidden_size, mlp_hidden, **kw)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        hw: tuple[int, int],
        key_mask: Optional[torch.Tensor],
        caption_kv: tuple[torch.Tensor, torch.Tensor],
        caption_bias: Optional[torch.Tensor],
        attention: AttentionBackend = TORCH,
    ) -> torch.Tensor:
        """``x (N, L, T, C)``; ``cond (N, L, 6, C)`` = t0 + r0 per domain; ``key_mask (N, L*T)`` or None;
        ``attention``: the model's resolved backend."""
        N, L, T, C = x.shape
        mod = self.scale_shift_table.to(cond.dtype) + cond  # (N, L, 6, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(3).unbind(2)  # 6 x (N, L, 1, C)

        z = modulate(x, shift1, scale1, attention).view(N, L * T, C)
        x = gate_residual(x, gate1, self.attn(z, key_mask, attention).view(N, L, T, C), attention)

        x = x + self.cross_attn(x.view(N, L * T, C), caption_kv, caption_bias).view(N, L, T, C)

        z = modulate(x, shift2, scale2, attention).view(N * L, T, C)
        return gate_residual(x, gate2, self.mlp(z, *hw, attention=attention).view(N, L, T, C), attention)


class FinalLayer(nn.Module):
    """Per-domain output head: adaLN on the raw (t + r_d) embedding, then a Linear to ``patch^2 * out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.linear = operations.Linear(
            hidden_size, patch_size * patch_size * out_channels, bias=True, dtype=dtype, device=device
        )
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (N, T, C)``, ``cond (N, C)`` -> ``(N, T, patch^2 * out_channels)``."""
        shift, scale = (self.scale_shift_table.to(cond.dtype)[None] + cond[:, None]).unbind(1)  # 2 x (N, C)
        return self.linear(modulate(x, shift[:, None], scale[:, None]))  # small: the torch path is enough
