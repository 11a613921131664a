"""Image geometry: the official aspect-ratio buckets, condition resizing and cropping, output resizing; and the one
function that reads image files (:func:`load_rgb8`).

Images here are float tensors ``(B, 3, H, W)``; callers say whether they hold [0, 1] or [-1, 1] values, and every
operation is linear, so both work.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO, Optional, Union

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------------
# Reading image files
# ---------------------------------------------------------------------------------------------------------------------

# The most pixels an image file may decode to: 8192 x 8192 (67 MP; the largest size the nodes make). Larger files are
# refused with a clear error before they are decoded (phone photos are 12-50 MP; Pillow's own bomb check stops at
# 179 MP, and the per-pixel cost of annotating the maps at the image's size grows with it).
MAX_IMAGE_PIXELS = 8192 * 8192

_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION) or 1)
    except Exception:  # a broken EXIF block: read the pixels as stored
        return 1


def _upright(im):
    """``im`` turned as its EXIF orientation says (what every viewer shows); unchanged without one."""
    from PIL import ImageOps

    if _orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: read the pixels as stored
        return im


def _to_rgb8(im) -> np.ndarray:
    """Any Pillow mode -> ``(H, W, 3)`` uint8. 16-bit and 32-bit integer grey (``I;16*``, ``I``) are scaled from
    0..65535, float grey (``F``) from 0..1 when it lies there (else Pillow's 0..255), and images with transparency
    (RGBA, LA, P with a transparent colour, ...) are composited on white."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im).astype(np.float64)
        if mode == "F":
            a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
            a = a * 255 if a.size and a.min() >= 0 and a.max() <= 1 else a
        else:  # I;16, I;16B, I;16L, I;16N and I (which Pillow also uses for 16-bit PNGs)
            a = np.clip(a, 0, 65535) / 257
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255
        return np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, RGBX
    return np.asarray(im)


def load_rgb8(
    source: Union[str, os.PathLike, BinaryIO],
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    cover: Optional[tuple[int, int]] = None,
) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB, upright (EXIF orientation applied), whatever its mode.

    ``cover=(height, width)``: the caller only needs an image that covers this size, so a JPEG may be decoded at a
    reduced scale (1/2, 1/4, 1/8) for speed. A ValueError saying why for anything that cannot be read: not an
    image, truncated, empty, or more than ``max_pixels`` pixels (decompression bombs included).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            w, h = im.size
            if cover is not None and im.format == "JPEG":
                uh, uw = (w, h) if _orientation(im) in _ROTATED_ORIENTATIONS else (h, w)  # upright size
                scale = max(cover[0] / uh, cover[1] / uw)
                req = (max(1, int(w * scale + 1)), max(1, int(h * scale + 1)))
                im.draft(im.mode, req)
                w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"{w}x{h} (WxH) is {w * h / 1e6:.0f} MP, more than the {max_pixels / 1e6:.0f} MP "
                                 f"this reads (imaging.MAX_IMAGE_PIXELS)")
            im.load()  # decode now, so a truncated file fails here
            arr = _to_rgb8(_upright(im))
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image: too large: {e}") from None
    except ValueError as e:
        raise ValueError(f"cannot read image: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, MemoryError) as e:
        empty = isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.path.getsize(source) == 0
        raise ValueError(f"cannot read image: {'empty file (0 bytes)' if empty else f'{type(e).__name__}: {e}'}") \
            from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError("cannot read image: zero-sized image")
    return arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy()  # torch wants a writable array


def header_size(source: Union[str, os.PathLike, BinaryIO]) -> tuple[int, int]:
    """``(height, width)`` of an image file upright, as :func:`load_rgb8` would read it, from its header alone (no
    pixels are decoded: cheap enough to sort a large folder by aspect ratio). A PNG whose EXIF block follows its
    pixel data (rare) counts as not turned here. A ValueError for anything Pillow cannot open."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            w, h = im.size
            # Pillow decodes a PNG to look for an EXIF block it has not met in the header: skip that
            if (im.format != "PNG" or "exif" in im.info) and _orientation(im) in _ROTATED_ORIENTATIONS:
                h, w = w, h
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from None
    return h, w


def upright_copy(path: Union[str, os.PathLike]) -> Optional[bytes]:
    """The file at ``path`` re-encoded upright when its EXIF orientation turns it, else None (copy it as it is).

    The copy keeps the format, the ICC profile and the other EXIF fields (the orientation tag is reset); a JPEG keeps
    its quantisation tables and chroma subsampling, so it loses no more than one re-encode at its own quality."""
    from PIL import Image, JpegImagePlugin

    with Image.open(path) as im:
        if _orientation(im) == 1:
            return None
        fmt = im.format
        im.load()
        out = _upright(im)
        kw = {"exif": out.getexif().tobytes()}
        if im.info.get("icc_profile"):
            kw["icc_profile"] = im.info["icc_profile"]
        if fmt == "JPEG":
            kw["qtables"] = im.quantization
            sampling = JpegImagePlugin.get_sampling(im)
            if sampling >= 0:
                kw["subsampling"] = sampling
        elif fmt == "WEBP":
            kw["lossless"] = True  # Pillow cannot tell a lossy WebP from a lossless one: lose nothing
        buf = io.BytesIO()
        out.save(buf, fmt, **kw)
        return buf.getvalue()
