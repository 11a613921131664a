"""Janus' generation image tokenizer, decode side only (LlamaGen VQ-16): codes -> image in [-1, 1].

Attribute names follow the original checkpoint under ``gen_vision_model.``: ``quantize.embedding``,
``post_quant_conv``, ``decoder.{conv_in, mid.{0,1,2}, conv_blocks.L.{res.i, attn.i, upsample.conv}, norm_out,
conv_out}``. ``decoder.conv_blocks[0]`` is the LOWEST resolution level. The encoder and ``quant_conv`` (image ->
codes) are not needed to generate and are not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VQConfig


def _norm(channels: int, *, dtype=None, device=None, operations=nn) -> nn.Module:
    return operations.GroupNorm(32, channels, eps=1e-6, affine=True, dtype=dtype, device=device)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = _norm(in_ch, operations=operations, **kw)
        self.conv1 = operations.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.norm2 = _norm(out_ch, operations=operations, **kw)
        self.conv2 = operations.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.nin_shortcut = operations.Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections."""

    def __init__(self, ch: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm = _norm(ch, operations=operations, **kw)
        self.q = operations.Conv2d(ch, ch, 1, **kw)
        self.k = operations.Conv2d(ch, ch, 1, **kw)
        self.v = operations.Conv2d(ch, ch, 1, **kw)
        self.proj_out = operations.Conv2d(ch, ch, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head over all pixels
        q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, ch: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(ch, ch, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DecoderLevel(nn.Module):
    def __init__(self, in_ch, out_ch, num_blocks, with_attn, with_upsample, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.res = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, **kw) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, **kw) for _ in range(num_blocks if with_attn else 0))
        self.upsample = Upsample(out_ch, **kw) if with_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.upsample(x) if self.upsample is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        levels = len(cfg.channel_mult)
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = operations.Conv2d(cfg.z_channels, ch, 3, padding=1, dtype=dtype, device=device)
        self.mid = nn.ModuleList([ResnetBlock(ch, ch, **kw), AttnBlock(ch, **kw), ResnetBlock(ch, ch, **kw)])
        self.conv_blocks = nn.ModuleList()
        for i in range(levels):  # lowest resolution first
            out_ch = cfg.base_channels * cfg.channel_mult[levels - 1 - i]
            self.conv_blocks.append(
                DecoderLevel(ch, out_ch, cfg.num_res_blocks + 1, with_attn=i == 0, with_upsample=i < levels - 1, **kw)
            )
            ch = out_ch
        self.norm_out = _norm(ch, dtype=dtype, device=device, operations=operations)
        self.conv_out = operations.Conv2d(ch, cfg.out_channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CodebookQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.embedding = operations.Embedding(cfg.codebook_size, cfg.codebook_dim, dtype=dtype, device=device)

    def lookup(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, grid*grid) codes -> (B, codebook_dim, grid, grid) L2-normalised code vectors."""
        z = F.normalize(self.embedding(codes), p=2, dim=-1)
        return z.view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class VQDecoderModel(nn.Module):
    """``gen_vision_model.``: decode (B, grid*grid) codes to (B, 3, grid*16, grid*16) images in ~[-1, 1]."""

    def __init__(self, cfg: VQConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        self.quantize = CodebookQuantizer(cfg, operations=operations, **kw)
        self.post_quant_conv = operations.Conv2d(cfg.codebook_dim, cfg.z_channels, 1, **kw)
        self.decoder = Decoder(cfg, operations=operations, **kw)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim != 2:
            raise ValueError(f"Image codes must be (B, tokens), got shape {tuple(codes.shape)}.")
        grid = int(round(codes.shape[1] ** 0.5))
        if grid * grid != codes.shape[1]:
            raise ValueError(f"{codes.shape[1]} image codes do not form a square grid.")
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(f"Image codes must lie in [0, {self.config.codebook_size}).")
        z = self.quantize.lookup(codes.long(), grid)
        return self.decoder(self.post_quant_conv(z))
