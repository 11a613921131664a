"""Image geometry: the official aspect-ratio buckets, condition resizing and cropping, output resizing.

Images here are float tensors ``(B, 3, H, W)``; callers say whether they hold [0, 1] or [-1, 1] values, and every
operation is linear, so both work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The 15 official (height, width) buckets at 1024 px, keyed by height / width (app/jodi_pipeline.py: base_ratios).
ASPECT_BUCKETS: dict[float, tuple[int, int]] = {
    0.25: (512, 2048),
    0.33: (576, 1728),
    0.4: (640, 1600),
    0.5: (704, 1408),
    0.67: (768, 1152),
    0.75: (864, 1152),
    0.82: (896, 1088),
    1.0: (1024, 1024),
    1.21: (1088, 896),
    1.33: (1152, 864),
    1.5: (1152, 768),
    2.0: (1408, 704),
    2.5: (1600, 640),
    3.0: (1728, 576),
    4.0: (2048, 512),
}
# Presets for the nodes: "W:H" names as users say them.
ASPECT_PRESETS: dict[str, float] = {
    "1:1": 1.0, "4:3": 0.75, "3:4": 1.33, "3:2": 0.67, "2:3": 1.5, "16:9": 0.5, "9:16": 2.0,
    "2:1": 0.5, "1:2": 2.0, "5:4": 0.82, "4:5": 1.21, "5:2": 0.4, "2:5": 2.5, "3:1": 0.33, "1:3": 3.0,
}  # fmt: skip


def check_positive_size(height: int, width: int, what: str = "image") -> tuple[int, int]:
    """``(height, width)`` as ints; a clear error unless both are positive whole numbers."""
    sizes = []
    for name, v in (("height", height), ("width", width)):
        try:  # Python, numpy and 0-d torch numbers; not bools, strings or NaN
            whole = not isinstance(v, (bool, str)) and math.isfinite(float(v)) and int(v) == float(v) > 0
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise ValueError(f"{what} {name} must be a positive integer, got {v!r}.")
        sizes.append(int(v))
    return sizes[0], sizes[1]


def check_size(height: int, width: int, multiple: int = 32, what: str = "image") -> None:
    """Raise a clear error unless ``height`` and ``width`` are positive multiples of ``multiple``."""
    height, width = check_positive_size(height, width, what)
    if height % multiple or width % multiple:
        raise ValueError(
            f"{what} size {width}x{height} (WxH) is not a multiple of {multiple}; the DC-AE compresses by {multiple}, "
            f"so use e.g. {round(width / multiple) * multiple}x{round(height / multiple) * multiple}."
        )


def snap_to_bucket(height: int, width: int, base_size: int = 1024, multiple: int = 32) -> tuple[int, int]:
    """The official bucket closest in aspect ratio to ``height / width``, scaled to ``base_size``.

    At ``base_size=1024`` this is exactly the reference's ``classify_height_width_bin``; other base sizes (e.g. 512 or
    the demo model's 64) scale the bucket and round to ``multiple``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Size must be positive, got {width}x{height} (WxH).")
    ratio = height / width
    key = min(ASPECT_BUCKETS, key=lambda r: abs(r - ratio))
    h, w = ASPECT_BUCKETS[key]
    if base_size == 1024:
        return h, w
    scale = base_size / 1024
    return max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple)


def aspect_preset_size(preset: str, base_size: int = 1024, multiple: int = 32) -> tuple[int, int]:
    """(height, width) of a named aspect preset such as ``"16:9"``."""
    if preset not in ASPECT_PRESETS:
        raise ValueError(f"Unknown aspect preset {preset!r}; expected one of {', '.join(ASPECT_PRESETS)}.")
    ratio = ASPECT_PRESETS[preset]
    return snap_to_bucket(round(1024 * ratio), 1024, base_size, multiple)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with antialiasing (what torchvision's tensor ``Resize`` does)."""
    if images.shape[-2:] == (height, width):
        return images
    out = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out.to(images.dtype)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop with torchvision's rounding of the offsets."""
    h, w = images.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"Cannot crop {w}x{h} to the larger {width}x{height}.")
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return images[..., top : top + height, left : left + width]


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale to cover ``height x width`` keeping the aspect ratio, then centre crop, as the reference does for
    condition images."""
    ih, iw = images.shape[-2:]
    if height / ih > width / iw:
        size = (height, int(iw * height / ih))
    else:
        size = (int(ih * width / iw), width)
    if size[0] * size[1] > 4 * height * width:
        # Extreme aspect ratio: the covering image would be huge (8 x 2000 px -> 512 x 128000), so cut the source
        # to the window that survives the crop first (2 px of margin for the filter); within about a pixel the same.
        sh, sw = size[0] / ih, size[1] / iw
        win_h, win_w = min(ih, math.ceil(height / sh) + 2), min(iw, math.ceil(width / sw) + 2)
        images = center_crop(images, win_h, win_w)
        size = (max(height, round(win_h * sh)), max(width, round(win_w * sw)))
    return center_crop(resize(images, *size), height, width)


CONDITION_FITS = ("crop", "stretch")
# What the nodes and annotate use: maps that line up with the input pixel for pixel. The library keeps the
# reference's "crop" as its default.
ALIGNED_FIT = "stretch"


def fit_condition(images: torch.Tensor, height: int, width: int, fit: str = "crop") -> torch.Tensor:
    """Bring condition images to the working size. ``"crop"``: cover and centre-crop, as the reference does (the
    outputs, resized back to the input's size, are then shifted against it near the borders when its aspect ratio
    is not the bucket's). ``"stretch"``: resize to the working size, so that resizing the outputs back lines them up
    with the input pixel for pixel (the model sees the input slightly squeezed instead)."""
    if fit == "crop":
        return resize_and_crop(images, height, width)
    if fit == "stretch":
        return resize(images, height, width)
    raise ValueError(f"condition fit must be one of {', '.join(CONDITION_FITS)}, got {fit!r}.")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def latent_size(height: int, width: int, compression: int) -> tuple[int, int]:
    return math.ceil(height / compression), math.ceil(width / compression)
