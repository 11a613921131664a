"""ComfyUI's IMAGE and MASK layouts, to and from the ``(B, 3, H, W)`` images jodi_core works with.

ComfyUI-free (the unit tests import it without a host). ComfyUI's conventions:
- IMAGE: ``(B, H, W, C)`` float32 in [0, 1], channels last, C = 3 (LoadImage gives 3; RGBA and grey also occur);
- MASK: ``(B, H, W)`` float32 in [0, 1].
jodi_core works with ``(B, 3, H, W)`` images in [0, 1] and latent stacks ``(B, 8, C, h, w)``.
"""

from __future__ import annotations

import torch


def image_to_bchw(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, C)`` -> ``(B, 3, H, W)`` float32 in [0, 1]; grey is repeated, alpha dropped."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what} must be an IMAGE tensor, got {type(image).__name__}.")
    if image.dim() == 3:  # a single (H, W, C) image
        image = image[None]
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be an IMAGE shaped (B, H, W, 3), got {tuple(image.shape)}.")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(image.shape)}.")
    x = image.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values.")
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x[..., :3]
    return x.permute(0, 3, 1, 2).clamp(0, 1).contiguous()  # (B, H, W, 3) -> (B, 3, H, W)


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ComfyUI IMAGE ``(B, H, W, 3)`` float32 on the CPU."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def blank_image(batch: int, height: int, width: int) -> torch.Tensor:
    """Black IMAGE for a domain that a run did not produce."""
    return torch.zeros(batch, height, width, 3)


def index_to_index_image(index: torch.Tensor) -> torch.Tensor:
    """Class map ``(B, H, W)`` int -> IMAGE whose grey value is ``class / 255``: saved as 8-bit PNG, the pixel value is
    the class id (the usual 'index image' convention of segmentation datasets)."""
    g = index.float().div(255.0).clamp(0, 1)
    return g[..., None].expand(*g.shape, 3).contiguous().cpu()


def class_mask(index: torch.Tensor, class_id: int) -> torch.Tensor:
    """MASK ``(B, H, W)``: 1 where the class map equals ``class_id``."""
    return (index == class_id).float().cpu()
