"""SigLIP ViT (understanding encoder) and the MLP projectors that map features into the language model's width.

Attribute names follow the original checkpoint (timm layout under ``vision_model.vision_tower.``): ``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``. Janus keeps every patch token
(no class token) and all blocks plus the final norm; the MAP pooling head of the checkpoint is unused and not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SigLIPConfig


class SigLIPAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(width, 3 * width, bias=True, dtype=dtype, device=device)
        self.proj = operations.Linear(width, width, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SigLIPMlp(nn.Module):
    def __init__(self, width: int, hidden: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(width, hidden, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class SigLIPBlock(nn.Module):
    def __init__(self, cfg: SigLIPConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **kw)
        self.attn = SigLIPAttention(cfg.width, cfg.num_heads, operations=operations, **kw)
        self.norm2 = operations.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **kw)
        self.mlp = SigLIPMlp(cfg.width, cfg.mlp_hidden, operations=operations, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SigLIPConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Conv2d(
            3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)


class SigLIPVisionTower(nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, (S/patch)^2, width) features after the final LayerNorm."""

    def __init__(self, cfg: SigLIPConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = cfg
        kw = dict(dtype=dtype, device=device)
        self.patch_embed = PatchEmbed(cfg, operations=operations, **kw)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, cfg.width, **kw))
        self.blocks = nn.ModuleList(SigLIPBlock(cfg, operations=operations, **kw) for _ in range(cfg.depth))
        self.norm = operations.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, **kw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ValueError(f"The vision encoder expects (B, 3, {size}, {size}) pixels, got {tuple(pixels.shape)}.")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionModel(nn.Module):
    """Wrapper that reproduces the original ``vision_model.vision_tower.`` key prefix."""

    def __init__(self, cfg: SigLIPConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.vision_tower = SigLIPVisionTower(cfg, dtype=dtype, device=device, operations=operations)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixels)


class MlpProjector(nn.Module):
    """``mlp_gelu`` projector of depth 2: Linear -> GELU -> Linear (keys ``layers.0`` and ``layers.2``)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=None, device=None, operations=nn):
        super().__init__()
        self.layers = nn.Sequential(
            operations.Linear(in_dim, out_dim, dtype=dtype, device=device),
            nn.GELU(),
            operations.Linear(out_dim, out_dim, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
