"""DC-AE f32c32 (``dc-ae-f32c32-sana-1.0``): the deep-compression autoencoder under Sana and Jodi.

An image in [-1, 1] of size ``H x W`` (multiples of 32) becomes a raw latent ``(B, 32, H/32, W/32)`` and back. The
encoder is deterministic (no posterior). Jodi works on scaled latents: ``encode(img) * 0.41407`` and
``decode(z / 0.41407)``; that scaling stays outside :meth:`DCAE.encode` / :meth:`DCAE.decode` and is applied by
:meth:`DCAE.encode_scaled` / :meth:`DCAE.decode_scaled` (or by the caller with ``config.scaling_factor``).

Module attribute names follow the efficientvit ``DCAE`` (``encoder.stages.3.op_list.0.context_module.main.qkv.conv``
and so on), so the original checkpoint loads strictly as it is; diffusers ``AutoencoderDC`` checkpoints are converted
by :mod:`.keys`. Layout of the sana-1.0 model (widths 128..1024, 6 stages, each halving the size):

    encoder: project_in 3x3 -> [ResBlock x2, down] x3 -> [EViT x3, down] x2 -> EViT x3 -> project_out 3x3 (+avg)
    decoder: project_in 3x3 (+dup) -> EViT x3 -> [up, EViT x3] x2 -> [up, ResBlock x3] x3 -> RMSNorm, ReLU, 3x3

EViT is an EfficientViT block: multi-scale ReLU linear attention (LiteMLA) then a gated inverted-bottleneck conv
(GLUMBConv), each residual. Every down/up op carries a parameter-free shortcut (pixel-unshuffle + channel averaging,
channel duplication + pixel-shuffle), so the residual path keeps the signal across resolutions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dit.attention import TORCH, AttentionBackend, AttentionSetting
from .keys import detect_key_format, infer_dcae_config, original_keys

log = logging.getLogger(__name__)

__all__ = [
    "DCAEConfig",
    "DC_AE_F32C32_SANA_1_0",
    "DCAE",
    "SCALING_FACTOR",
    "DEFAULT_TILE_SIZE",
    "DEFAULT_TILE_OVERLAP",
]

SCALING_FACTOR = 0.41407  # sana-1.0 latent scale: Jodi latent = encode(img) * SCALING_FACTOR
_RMS_EPS = 1e-5
_ATTN_EPS = 1e-15
# What ``attention_backend="auto"`` means for the DC-AE: the reference's channel-major matmuls, whose 16-bit products
# are rounded as the reference rounds them; the Triton kernel has not been measured faster on the DC-AE's shapes
# (benchmarks/bench_dit.py), so it runs only when asked for by name.
AUTO_ATTENTION = "torch"
BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")  # EViT_GLU: no multi-scale branch; EViTS5_GLU: one 5x5 branch

# Tiling defaults, in image pixels. LiteMLA attention is global: a tile attends only within itself, so its output
# differs from the whole-image result everywhere, not just near its border, and tiles cannot match the untiled
# result exactly. What tiling can do is hide the disagreement: neighbouring tiles overlap and cross-fade linearly
# over the shared strip, so there is no seam, only a gradual hand-over. Measured on the tiny fixture model (random
# weights, 256x320 image, 128 px tiles), the mean |tiled - whole| of decode falls from 0.136 with no overlap to 0.084
# (overlap 64) and 0.074 (overlap 96), and 192 px tiles halve it again: bigger tiles (more attention context) matter
# most, then overlap. Hence 1024 px tiles, the resolution Jodi and the DC-AE were trained at (32x32 latent tokens,
# the context their attention statistics are used to), so tiling only starts above 1024 px, and a 256 px overlap
# (a quarter tile; tiles are spread evenly, so the shared strips are often wider).
DEFAULT_TILE_SIZE = 1024
DEFAULT_TILE_OVERLAP = 256


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCAEConfig:
    """Shape of a DC-AE. Encoder and decoder share ``width_list``; stage ``i`` runs at 1/2**i of the image size."""

    in_channels: int = 3
    latent_channels: int = 32
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depth_list: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_depth_list: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    attention_head_dim: int = 32
    expand_ratio: float = 4.0  # GLUMBConv hidden = expand_ratio * width (the inverted conv emits twice that)
    scaling_factor: float = SCALING_FACTOR

    def __post_init__(self):
        for f in ("width_list", "encoder_depth_list", "decoder_depth_list",
                  "encoder_block_types", "decoder_block_types"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        n = len(self.width_list)
        for f in ("encoder_depth_list", "decoder_depth_list", "encoder_block_types", "decoder_block_types"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"DCAEConfig.{f} has {len(getattr(self, f))} entries for {n} stages.")
        if n < 1:
            raise ValueError("DCAEConfig needs at least one stage.")
        if any(d < 1 for d in self.encoder_depth_list + self.decoder_depth_list):
            raise ValueError("DCAEConfig stages need at least one block (depth 0 stages are not supported).")
        for t in self.encoder_block_types + self.decoder_block_types:
            if t not in BLOCK_TYPES:
                raise ValueError(f"Unknown DC-AE block type {t!r}; expected one of {BLOCK_TYPES}.")
        # LiteMLA has width // head_dim heads (efficientvit's arithmetic): a width need not be a multiple of the head
        # dim, but without a whole head the reference cannot run
        for i, w in enumerate(self.width_list):
            uses_attention = "EViT" in self.encoder_block_types[i] or "EViT" in self.decoder_block_types[i]
            if uses_attention and w < self.attention_head_dim:
                raise ValueError(f"Stage {i} width {w} is smaller than the head dim {self.attention_head_dim}: "
                                 f"its attention would have no head.")
        # parameter-free shortcuts regroup channels, so the widths must divide each other
        for a, b in zip(self.width_list[:-1], self.width_list[1:]):
            if (4 * a) % b or (4 * a) < b:
                raise ValueError(f"Widths {a} -> {b}: the down shortcut needs 4*{a} to be a multiple of {b}.")
        if self.width_list[-1] % self.latent_channels:
            raise ValueError(
                f"Last width {self.width_list[-1]} is not a multiple of latent_channels {self.latent_channels}."
            )

    @property
    def num_stages(self) -> int:
        return len(self.width_list)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_stages - 1)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "DCAEConfig":
        """Infer the config from key names and shapes (either key format). ``overrides`` set non-inferable fields."""
        return replace(infer_dcae_config(original_keys(sd)), **overrides)


DC_AE_F32C32_SANA_1_0 = DCAEConfig()


# ---------------------------------------------------------------------------------------------------------------------
# Layers (attribute names = efficientvit state-dict keys)
# ---------------------------------------------------------------------------------------------------------------------


class RMSNorm2d(nn.Module):
    """RMS norm over the channel dim of ``(B, C, H, W)``; statistics in float32, then ``* weight + bias``."""

    def __init__(self, channels: int, eps: float = _RMS_EPS, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = x.float().square().mean(dim=1, keepdim=True)
        x = (x / torch.sqrt(mean_sq + self.eps)).to(x.dtype)
        return x * self.weight.to(x.dtype).view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)


class ConvLayer(nn.Module):
    """``conv`` (same padding), then an optional ``norm`` (RMSNorm2d) and activation, as efficientvit's ConvLayer."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1, bias: bool = True,
                 norm: bool = False, act: Optional[Callable] = None, dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations or nn
        self.conv = ops.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias,
                               dtype=dtype, device=device)
        self.norm = RMSNorm2d(out_ch, dtype=dtype, device=device) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """Ops run in order; stored as ``op_list`` to match the checkpoint keys."""

    def __init__(self, ops: Sequence[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class ResidualBlock(nn.Module):
    """``main(x) + shortcut(x)``."""

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


class PixelUnshuffleChannelAveraging(nn.Module):
    """Parameter-free down shortcut: pixel-unshuffle by ``factor``, then average groups of channels to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, factor: int):
        super().__init__()
        self.factor = factor
        self.out_ch = out_ch
        self.group = in_ch * factor**2 // out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.pixel_unshuffle(x, self.factor)  # (B, C*f*f, H/f, W/f)
        B, _, H, W = x.shape
        return x.reshape(B, self.out_ch, self.group, H, W).mean(dim=2)  # consecutive channels form a group


class ChannelDuplicatingPixelShuffle(nn.Module):
    """Parameter-free up shortcut: repeat every channel, then pixel-shuffle by ``factor``."""

    def __init__(self, in_ch: int, out_ch: int, factor: int):
        super().__init__()
        self.factor = factor
        self.repeats = out_ch * factor**2 // in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.repeats, dim=1)  # (B, out*f*f, H, W), each channel repeated in place
        return F.pixel_shuffle(x, self.factor) if self.factor > 1 else x


class InterpolateConv(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int, **kw):
        super().__init__()
        self.conv = ConvLayer(in_ch, out_ch, 3, bias=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """conv3x3 + SiLU, conv3x3 (no bias) + RMSNorm2d (the residual is added by the wrapping ResidualBlock)."""

    def __init__(self, channels: int, **kw):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=F.silu, **kw)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def _autocast_off(device_type: str):
    """A context with autocast disabled; a backend without autocast support (DirectML, meta) needs none."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, AssertionError, ValueError):
        return contextlib.nullcontext()


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all ``H*W`` positions of the feature map.

    ``qkv`` (1x1) gives ``heads`` groups of ``[q|k|v]`` (``dim`` channels each, interleaved per head); every
    multi-scale branch (depthwise kxk, then a grouped 1x1 with one group per q/k/v slice) adds as many heads again.
    Attention per head: ``out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps)`` with ReLU on q and k.

    ``attention`` (resolved by ``DCAE.attention_backend``) picks the linear form's implementation: without kernels
    (``torch``, and ``auto``: see :data:`AUTO_ATTENTION`) the reference's channel-major matmuls; with kernels
    (``triton``) ``jodi_core.dit.attention``'s token-major kernel (float32 accumulation) where it can run, the matmuls
    elsewhere.
    """

    attention: AttentionBackend = TORCH

    def __init__(self, channels: int, dim: int = 32, scales: tuple[int, ...] = (5,), dtype=None, device=None,
                 operations=None):
        super().__init__()
        ops = operations or nn
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.dim = dim
        self.eps = _ATTN_EPS
        heads = channels // dim
        total = 3 * heads * dim
        self.qkv = ConvLayer(channels, total, 1, bias=False, **kw)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                ops.Conv2d(total, total, k, padding=k // 2, groups=total, bias=False, dtype=dtype, device=device),
                ops.Conv2d(total, total, 1, groups=3 * heads, bias=False, dtype=dtype, device=device),
            )
            for k in scales
        )
        self.proj = ConvLayer(heads * dim * (1 + len(scales)), channels, 1, bias=False, norm=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [branch(qkv) for branch in self.aggreg], dim=1)  # (B, 3*dim*heads', H, W)
        B, _, H, W = qkv.shape
        # The reference runs the attention with autocast off and switches on the token count: linear form when
        # H*W > dim (always at useful sizes), quadratic otherwise; the two differ only in where eps enters.
        with _autocast_off(qkv.device.type):
            if H * W > self.dim and self.attention.takes_kernels(qkv):
                out = self._linear_token_major(qkv)
            elif H * W > self.dim:
                out = self._linear(qkv).to(qkv.dtype)
            else:
                out = self._quadratic(qkv)
        return self.proj(out.reshape(B, -1, H, W))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, _, H, W = qkv.shape
        qkv = qkv.reshape(B, -1, 3 * self.dim, H * W)  # (B, heads', [q|k|v] per head, N)
        q, k, v = qkv[:, :, : self.dim], qkv[:, :, self.dim : 2 * self.dim], qkv[:, :, 2 * self.dim :]
        return F.relu(q), F.relu(k), v

    def _linear(self, qkv: torch.Tensor) -> torch.Tensor:
        if qkv.dtype == torch.float16:
            qkv = qkv.float()  # fp16 would overflow the sums; bf16 stays bf16 for the matmuls, as the reference
        q, k, v = self._split(qkv)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, h, dim+1, N): the ones row yields the normaliser
        vk = v @ k.transpose(-1, -2)  # (B, h, dim+1, dim)
        out = vk @ q  # (B, h, dim+1, N)
        out = out.float()
        return out[:, :, :-1] / (out[:, :, -1:] + self.eps)  # (B, h, dim, N)

    def _linear_token_major(self, qkv: torch.Tensor) -> torch.Tensor:
        B, _, H, W = qkv.shape
        # One copy to (B, N, heads', [q|k|v], dim): the kernel reads the three as strided views.
        qkv = qkv.reshape(B, -1, 3, self.dim, H * W).permute(0, 4, 1, 2, 3).contiguous()
        q, k, v = qkv.unbind(3)
        out = self.attention.linear_attention(q, k, v, None, self.eps)  # (B, N, heads', dim)
        return out.permute(0, 2, 3, 1)  # (B, heads', dim, N)

    def _quadratic(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(qkv)
        att = k.transpose(-1, -2) @ q  # (B, h, N_keys, N_queries)
        att32 = att.float()
        att = (att32 / (att32.sum(dim=2, keepdim=True) + self.eps)).to(att.dtype)
        return v @ att  # (B, h, dim, N)


class GLUMBConv(nn.Module):
    """1x1 (C -> 2*hidden) + SiLU, depthwise 3x3, ``value * SiLU(gate)``, 1x1 (hidden -> C, no bias) + RMSNorm2d."""

    def __init__(self, channels: int, expand_ratio: float = 4.0, **kw):
        super().__init__()
        hidden = round(channels * expand_ratio)
        self.inverted_conv = ConvLayer(channels, 2 * hidden, 1, bias=True, act=F.silu, **kw)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, groups=2 * hidden, bias=True, **kw)
        self.point_conv = ConvLayer(hidden, channels, 1, bias=False, norm=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(value * F.silu(gate))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, dim: int, scales: tuple[int, ...], expand_ratio: float, **kw):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, dim, scales, **kw), nn.Identity())
        self.local_module = ResidualBlock(GLUMBConv(channels, expand_ratio, **kw), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def _make_block(block_type: str, channels: int, cfg: DCAEConfig, kw: dict) -> nn.Module:
    if block_type == "ResBlock":
        return ResidualBlock(ResBlock(channels, **kw), nn.Identity())
    scales = (5,) if block_type == "EViTS5_GLU" else ()
    return EfficientViTBlock(channels, cfg.attention_head_dim, scales, cfg.expand_ratio, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig, **kw):
        super().__init__()
        w = cfg.width_list
        self.project_in = ConvLayer(cfg.in_channels, w[0], 3, bias=True, **kw)
        stages = []
        for s, (width, depth) in enumerate(zip(w, cfg.encoder_depth_list)):
            ops = [_make_block(cfg.encoder_block_types[s], width, cfg, kw) for _ in range(depth)]
            if s < cfg.num_stages - 1:
                down = ConvLayer(width, w[s + 1], 3, stride=2, bias=True, **kw)
                ops.append(ResidualBlock(down, PixelUnshuffleChannelAveraging(width, w[s + 1], 2)))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        out = ConvLayer(w[-1], cfg.latent_channels, 3, bias=True, **kw)
        shortcut = PixelUnshuffleChannelAveraging(w[-1], cfg.latent_channels, 1)  # mean over channel groups
        self.project_out = ResidualBlock(OpSequential([out]), shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig, **kw):
        super().__init__()
        w = cfg.width_list
        inp = ConvLayer(cfg.latent_channels, w[-1], 3, bias=True, **kw)
        self.project_in = ResidualBlock(inp, ChannelDuplicatingPixelShuffle(cfg.latent_channels, w[-1], 1))
        stages = []
        for s, (width, depth) in enumerate(zip(w, cfg.decoder_depth_list)):
            ops = []
            if s < cfg.num_stages - 1:
                up = InterpolateConv(w[s + 1], width, **kw)
                ops.append(ResidualBlock(up, ChannelDuplicatingPixelShuffle(w[s + 1], width, 2)))
            ops += [_make_block(cfg.decoder_block_types[s], width, cfg, kw) for _ in range(depth)]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)  # indexed by stage; run from the last (smallest) to stage 0
        norm = RMSNorm2d(w[0], dtype=kw.get("dtype"), device=kw.get("device"))
        self.project_out = OpSequential([norm, nn.ReLU(), ConvLayer(w[0], cfg.in_channels, 3, bias=True, **kw)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


# ---------------------------------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``[0, size)`` with at least ``overlap`` shared cells; the last tile ends at ``size``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    # spread the tiles evenly so every overlap is about the same (>= overlap) instead of one thin last overlap
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, ramp_start: int, ramp_end: int, device) -> torch.Tensor:
    """1-D blend weights of one tile: linear ramps over the cells it shares with the previous / next tile."""
    pos = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(length, device=device)
    if ramp_start > 0:
        w = torch.minimum(w, pos / ramp_start)
    if ramp_end > 0:
        w = torch.minimum(w, (length - pos) / ramp_end)
    return w


def _axis_ramps(starts: list[int], tile: int) -> list[tuple[int, int]]:
    """Per tile, how many cells it shares with its previous and next neighbour along one axis."""
    prev = [0] + [a + tile - b for a, b in zip(starts[:-1], starts[1:])]
    return list(zip(prev, prev[1:] + [0]))


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float,
           out_channels: int, align: int = 1) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile x tile`` windows of ``x`` and cross-fade the outputs.

    ``tile``/``overlap`` are in input cells, multiples of ``align``; tile origins are multiples of ``align`` too (the
    encoder needs whole 32-pixel blocks so that tile latents land on the full image's latent grid), and the tiles
    are spread evenly, so neighbours share at least ``overlap`` cells. Outputs are ``scale`` times larger.

    Each output pixel is the weight-normalised sum of the tiles covering it. A tile's weight ramps linearly from 0 to
    1 across the whole strip it shares with a neighbour, so two tiles cross-fade (their weights sum to one) and the
    result is continuous: no seam, and a single tile's output wherever only one tile covers.
    """
    B, _, H, W = x.shape
    ys = [align * s for s in _tile_starts(H // align, tile // align, overlap // align)]
    xs = [align * s for s in _tile_starts(W // align, tile // align, overlap // align)]
    log.debug("DC-AE tiling %dx%d input into %dx%d tiles of %d (overlap %d)", H, W, len(ys), len(xs), tile, overlap)
    th, tw = min(tile, H), min(tile, W)
    ramps_y, ramps_x = _axis_ramps(ys, th), _axis_ramps(xs, tw)
    out = None
    weight = None
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            piece = fn(x[:, :, y0 : y0 + th, x0 : x0 + tw])
            if out is None:
                out = torch.zeros(B, out_channels, round(H * scale), round(W * scale), device=piece.device,
                                  dtype=torch.float32)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device, dtype=torch.float32)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, *(round(r * scale) for r in ramps_y[iy]), piece.device)
            wx = _ramp(pw, *(round(r * scale) for r in ramps_x[ix]), piece.device)
            w2 = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, ph, pw)
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[:, :, oy : oy + ph, ox : ox + pw] += piece.float() * w2
            weight[:, :, oy : oy + ph, ox : ox + pw] += w2
            del piece
    return (out / weight).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------------------------------


class DCAE(nn.Module):
    """DC-AE with the efficientvit state-dict layout. ``encode``/``decode`` work on raw (unscaled) latents."""

    # ``auto | triton | torch`` for every LiteMLA block (see ``LiteMLA``; ``auto`` = :data:`AUTO_ATTENTION`).
    attention_backend = AttentionSetting(auto=AUTO_ATTENTION)

    def __init__(self, config: DCAEConfig = DC_AE_F32C32_SANA_1_0, dtype=None, device=None, operations=None,
                 attention_backend: str = "auto"):
        super().__init__()
        if not isinstance(config, DCAEConfig):
            raise TypeError(f"config must be a DCAEConfig, got {type(config).__name__}.")
        self.config = config
        self._plain_ops = operations is None  # host ops (ComfyUI manual_cast) may cast weights per call
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.attention_backend = attention_backend
        self.check_inputs = True  # the NaN/inf check costs one host sync per encode/decode

    # ---- properties used by the pipeline ----------------------------------------------------------------------------

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    # ---- input checks -----------------------------------------------------------------------------------------------

    def _check_dtype(self, t: torch.Tensor, what: str) -> None:
        weight = self.encoder.project_in.conv.weight
        if self._plain_ops and t.dtype != weight.dtype:
            raise TypeError(
                f"DC-AE {what} got a {t.dtype} tensor but the model weights are {weight.dtype}; "
                f"cast the input with .to({weight.dtype}) or the model with .to({t.dtype})."
            )

    def _check_input(self, t: torch.Tensor, op: str, layout: str, channels: int, unit: str) -> None:
        """Type, rank and channel checks shared by encode (images) and decode (latents)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"DC-AE {op} expects a floating-point tensor, got {getattr(t, 'dtype', type(t))}.")
        if t.ndim != 4:
            raise ValueError(f"DC-AE {op} expects {layout}, got shape {tuple(t.shape)}.")
        if t.shape[1] != channels:
            raise ValueError(
                f"DC-AE {op} expects {channels}{unit}, got {t.shape[1]} channels (shape {tuple(t.shape)})."
            )

    def _check_image(self, x: torch.Tensor) -> None:
        self._check_input(x, "encode", "(B, C, H, W) images", self.config.in_channels, "-channel images")
        f = self.spatial_compression
        H, W = x.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"DC-AE image size {H}x{W} (HxW) must be a non-zero multiple of {f} on both sides.")
        self._check_dtype(x, "encode")
        self._check_finite(x, "encode", "an image")

    def _check_finite(self, t: torch.Tensor, op: str, what: str) -> None:
        if self.check_inputs and not bool(torch.isfinite(t).all()):
            raise ValueError(f"DC-AE {op} got {what} with NaN or infinite values.")

    def _check_latent(self, z: torch.Tensor) -> None:
        self._check_input(z, "decode", "(B, C, h, w) latents", self.config.latent_channels, " latent channels")
        if z.shape[-1] == 0 or z.shape[-2] == 0:
            raise ValueError(f"DC-AE decode got an empty latent of shape {tuple(z.shape)}.")
        self._check_dtype(z, "decode")
        self._check_finite(z, "decode", "a latent")

    def _tiling(self, tile_size: Optional[int], overlap: Optional[int]) -> tuple[int, int]:
        tile = DEFAULT_TILE_SIZE if tile_size is None else int(tile_size)
        overlap = DEFAULT_TILE_OVERLAP if overlap is None else int(overlap)
        f = self.spatial_compression
        if tile <= 0 or tile % f:
            raise ValueError(f"DC-AE tile_size {tile} must be a positive multiple of {f} pixels.")
        if overlap < 0 or overlap % f or overlap >= tile:
            raise ValueError(f"DC-AE tile overlap {overlap} must be a multiple of {f} pixels in [0, {tile}).")
        return tile, overlap

    # ---- encode / decode --------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, tiled: bool = False, tile_size: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> raw latents ``(B, latent_channels, H/32, W/32)``.

        ``tiled=True`` (or a ``tile_size``) encodes overlapping ``tile_size`` pixel windows and cross-fades them over
        ``overlap`` pixels; an image that fits one tile is encoded whole.
        """
        self._check_image(x)
        if not (tiled or tile_size is not None):
            return self.encoder(x)
        tile, ov = self._tiling(tile_size, overlap)
        if x.shape[-2] <= tile and x.shape[-1] <= tile:
            return self.encoder(x)
        f = self.spatial_compression
        return _tiled(self.encoder, x, tile, ov, 1 / f, self.config.latent_channels, align=f)

    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        """Raw latents ``(B, latent_channels, h, w)`` -> images ``(B, 3, 32h, 32w)``, not clamped.

        Any batch works, e.g. all 8 Jodi domains at once as ``(B*8, 32, h, w)``. ``tiled``/``tile_size``/``overlap``
        (image pixels) as in :meth:`encode`.
        """
        self._check_latent(z)
        if not (tiled or tile_size is not None):
            return self.decoder(z)
        tile, ov = self._tiling(tile_size, overlap)
        f = self.spatial_compression
        if z.shape[-2] * f <= tile and z.shape[-1] * f <= tile:
            return self.decoder(z)
        return _tiled(self.decoder, z, tile // f, ov // f, f, self.config.in_channels)

    def encode_scaled(self, x: torch.Tensor, **tiling) -> torch.Tensor:
        """Jodi's latent convention: ``encode(x) * scaling_factor``."""
        return self.encode(x, **tiling) * self.config.scaling_factor

    def decode_scaled(self, z: torch.Tensor, **tiling) -> torch.Tensor:
        """Inverse of :meth:`encode_scaled`: ``decode(z / scaling_factor)``."""
        return self.decode(z / self.config.scaling_factor, **tiling)

    # ---- loading ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None, device=None,
                        *, name: str = "DC-AE checkpoint", operations=None, weight_dtype: str = "default") -> "DCAE":
        """Build a DC-AE for ``sd`` (efficientvit or diffusers keys) without a random init and load it strictly.
        ``weight_dtype`` / ``operations``: fp8 storage and host layers, as in :func:`jodi_core.loading.load_dcae`."""
        from .. import fp8
        from ..loading import build_on_meta, expect_checkpoint

        sd, scales = fp8.split_scales(sd, name=name)
        expect_checkpoint(sd, ("dcae", "dcae-diffusers"), name=name, what="a DC-AE (dc-ae-f32c32)")
        if scales and detect_key_format(sd) == "diffusers":  # q/k/v are fused on conversion: one scale cannot follow
            sd, scales = fp8.dequantize_all(sd, scales, dtype), fp8.Scales()
        sd = original_keys(sd)
        config = infer_dcae_config(sd)
        operations = fp8.operations_for(weight_dtype, operations)
        model = build_on_meta(lambda: cls(config, dtype=dtype, operations=operations))
        fp8.load_weights(model, sd, scales, what="DC-AE", weight_dtype=weight_dtype,
                         dtype=dtype, device=device)
        return model.eval()
