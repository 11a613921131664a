"""Jodi's maps in the conventions of other tools (ControlNets, ADE20K-trained models), as ComfyUI IMAGEs.

ComfyUI-free (the unit tests import it without a host).
"""

from __future__ import annotations

import torch

from ..jodi_core import imaging
from ..jodi_core.domains import SEG12_CLASSES, ade150_to_seg12, seg_palette, seg_to_index
from .layouts import bchw_to_image, image_to_bchw


def depth_for_controlnet(depth: torch.Tensor, invert: bool = False, normalize: bool = True) -> torch.Tensor:
    """Depth IMAGE -> the ControlNet depth convention: grey, near bright, far dark, stretched to the full range.

    Jodi's depth maps already have near = bright (as MiDaS/Depth-Anything give relative inverse depth), so the default
    only converts to grey and normalises per image; ``invert`` serves tools that expect near = dark.
    """
    x = image_to_bchw(depth, "depth").mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if normalize:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        span = hi - lo
        x = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), x)
    if invert:
        x = 1 - x
    return bchw_to_image(x)


def flip_normal(normal: torch.Tensor, flip_red: bool = False, flip_green: bool = False,
                flip_blue: bool = False) -> torch.Tensor:
    """Normal IMAGE with the chosen axes mirrored (a channel c becomes 1 - c, i.e. the vector component's sign flips).

    Jodi's normals are red = left, green = up, blue = towards the viewer, as the normal-BAE/DSINE preprocessors draw
    them (control_v11p_sd15_normalbae takes them as they are). OpenGL-style maps (red = right, green = up): flip red.
    DirectX-style (red = right, green = down): flip red and green.
    """
    x = image_to_bchw(normal, "normal").clone()
    for c, flip in enumerate((flip_red, flip_green, flip_blue)):
        if flip:
            x[:, c] = 1 - x[:, c]
    return bchw_to_image(x)


# ADE20K ids chosen by meaning where the most frequent member would mislead a segmentation ControlNet: the generic
# "plant" (18) rather than "tree" (5) for lawns and shrubs, "chair" (20) rather than "bed" (8) for furniture.
_ADE_REPRESENTATIVES = {"plant": 18, "furniture": 20}


def seg12_to_ade150() -> torch.Tensor:
    """Index map (12,) from Jodi classes to one ADE20K class each (0 = unlabelled stays 0).

    Several ADE20K classes merge into each Jodi class; the representative is the lowest ADE20K index among them (ADE20K
    numbers its classes by decreasing pixel frequency: person -> person, vehicle -> car, wall -> wall), except for the
    classes in ``_ADE_REPRESENTATIVES`` (plant -> plant, furniture -> chair).
    """
    to12 = ade150_to_seg12()
    out = torch.zeros(12, dtype=torch.long)
    for c in range(1, 12):
        members = torch.nonzero(to12[1:] == c).flatten() + 1
        out[c] = int(members[0]) if members.numel() else 0
    for name, ade in _ADE_REPRESENTATIVES.items():
        out[SEG12_CLASSES.index(name)] = ade
    return out


def seg_index_from_image(seg: torch.Tensor) -> torch.Tensor:
    """Jodi segmentation IMAGE -> class map ``(B, H, W)``: nearest palette colour, or, for a grey class-index image
    (the ``seg_classes`` output: grey = id / 255), the ids themselves."""
    x = image_to_bchw(seg, "segmentation")
    ids = x[:, 0] * 255
    grey = (x[:, :1] == x).all()
    is_index_image = grey and (ids - ids.round()).abs().max() < 1e-3 and ids.max() < len(SEG12_CLASSES)
    if is_index_image and ids.max() > 0:  # an all-black map is the palette's "unlabeled" either way
        return ids.round().long()
    return seg_to_index(imaging.to_model_range(x))


def seg_to_ade150(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jodi-palette segmentation IMAGE -> (IMAGE in the ADE20K-150 palette, ADE20K class map ``(B, H, W)``)."""
    index12 = seg_index_from_image(seg)
    ade = seg12_to_ade150().to(index12.device)[index12]  # (B, H, W) ADE20K ids, 0 = unlabelled
    palette = seg_palette("colors150").to(index12.device) / 255  # (151, 3), row 0 black
    return bchw_to_image(palette[ade].permute(0, 3, 1, 2)), ade
