"""Pure helpers behind the ComfyUI nodes: layout conversions, option tables, role resolution, map conventions.

Nothing here imports ComfyUI, so the node glue can be unit-tested without a host. ComfyUI's conventions, which this
module converts to and from:
- IMAGE: ``(B, H, W, C)`` float32 in [0, 1], channels last, C = 3 (LoadImage gives 3; RGBA and grey also occur);
- MASK: ``(B, H, W)`` float32 in [0, 1].
jodi_core works with ``(B, 3, H, W)`` images in [0, 1] and latent stacks ``(B, 8, C, h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from . import imaging
from .attention import backend_names
from .domains import (
    DOMAIN_NAMES, LABEL_NAMES, NUM_DOMAINS, SEG12_CLASSES, Role, ade150_to_seg12, get_domain, parse_roles, seg_palette,
    seg_to_index,
)

# ---------------------------------------------------------------------------------------------------------------------
# Option tables shown in the nodes' combos (the server does not check V3 combo values, so the nodes check them here)
# ---------------------------------------------------------------------------------------------------------------------

ROLE_AUTO = "auto"
ROLE_CHOICES: tuple[str, ...] = (ROLE_AUTO, "generate", "condition", "ignore")
SAMPLERS: dict[str, str] = {"dpm++2m-flow": "dpmpp_2m", "euler-flow": "euler"}  # node label -> jodi_core name
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
ATTENTION_CHOICES: tuple[str, ...] = backend_names()  # the registry of jodi_core.attention
ASPECT_AUTO = "auto (condition image, else width x height)"
ASPECT_CUSTOM = "width x height"
ASPECT_CHOICES: tuple[str, ...] = (ASPECT_AUTO, ASPECT_CUSTOM, *imaging.ASPECT_PRESETS)
DEMO_MODEL_CHOICE = "jodi-demo (built-in)"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF  # torch.Generator.manual_seed takes 64-bit seeds


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_number(name: str, value, lo: float, hi: float, integer: bool = False):
    """Range check with a message naming the input (the server skips min/max for inputs validate_inputs names)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not (lo <= value <= hi):  # also false for NaN
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value!r}.")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value) if integer else float(value)


def torch_dtype(choice: str) -> Optional[torch.dtype]:
    """``"auto"`` -> None (the caller picks), else the named dtype."""
    check_choice("dtype", choice, DTYPE_CHOICES)
    return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


# ---------------------------------------------------------------------------------------------------------------------
# Layout conversions
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Roles and conditions
# ---------------------------------------------------------------------------------------------------------------------


def resolve_role(domain: str, choice: Optional[str], connected: bool) -> str:
    """One domain's role: ``auto`` is 'condition if an image is connected, else generate'."""
    choice = ROLE_AUTO if choice is None else check_choice(f"{domain}_role", choice, ROLE_CHOICES)
    if choice == ROLE_AUTO:
        return "condition" if connected else "generate"
    if choice == "condition" and not connected:
        raise ValueError(
            f"The {domain} role is 'condition' but no {domain} image is connected: connect one, or set the role "
            "to auto, generate or ignore."
        )
    return choice


@dataclass
class JodiRoles:
    """What the JODI_ROLES socket carries: one role name per domain and the condition IMAGEs (B, H, W, 3)."""

    roles: tuple[str, ...]
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.roles = tuple(Role.parse(r).name.lower() for r in self.roles)
        parse_roles([self.roles])  # 8 entries, at least one 'generate'
        for name in self.conditions:
            get_domain(name)
        for d, role in zip(DOMAIN_NAMES, self.roles):
            if role == "condition" and self.conditions.get(d) is None:
                raise ValueError(f"The {d} role is 'condition' but no {d} image was given.")

    @classmethod
    def from_choices(cls, choices: Mapping[str, Optional[str]], images: Mapping[str, Optional[torch.Tensor]]):
        roles = tuple(resolve_role(d, choices.get(d), images.get(d) is not None) for d in DOMAIN_NAMES)
        conditions = {d: images[d] for d, r in zip(DOMAIN_NAMES, roles) if r == "condition"}
        return cls(roles, conditions)

    def get_ram_usage(self) -> int:
        """Bytes held, for hosts that weigh cached outputs by size (ComfyUI's RAM-pressure cache)."""
        return sum(t.numel() * t.element_size() for t in self.conditions.values() if isinstance(t, torch.Tensor))

    def condition_tensors(self) -> dict[str, torch.Tensor]:
        """Condition images as ``(B, 3, H, W)`` in [0, 1], keyed by domain name."""
        return {d: image_to_bchw(img, f"the {d} condition image") for d, img in self.conditions.items()}

    def batch_size(self, requested: int) -> int:
        """Batch of a run: the requested size, or the condition batch when that is larger and the request is 1."""
        sizes = {img.shape[0] if img.dim() == 4 else 1 for img in self.conditions.values()}
        batch = max([requested, *sizes])
        bad = sorted(s for s in sizes if s not in (1, batch))
        if bad:
            raise ValueError(
                f"Condition images have batch sizes {sorted(sizes)}; each must be 1 or the run's batch size {batch}."
            )
        if requested not in (1, batch):
            raise ValueError(f"batch_size is {requested} but the condition images hold {batch} images.")
        return batch

    def first_condition_size(self) -> Optional[tuple[int, int]]:
        """(height, width) of the first connected condition image in domain order, if any."""
        for d in DOMAIN_NAMES:
            img = self.conditions.get(d)
            if img is not None:
                return int(img.shape[-3]), int(img.shape[-2])
        return None


def resolve_size(aspect: str, width: int, height: int, condition_size: Optional[tuple[int, int]], base_size: int,
                 multiple: int = 32) -> tuple[int, int]:
    """Output (height, width) of a run; the pipeline samples at the nearest official aspect bucket and resizes back.

    - auto: the first condition image's size, else width x height;
    - width x height: as given;
    - an aspect preset such as ``16:9``: the bucket size itself (scaled to the model's base size).
    """
    check_choice("aspect", aspect, ASPECT_CHOICES)
    if aspect == ASPECT_AUTO and condition_size is not None:
        return condition_size
    if aspect in (ASPECT_AUTO, ASPECT_CUSTOM):
        check_number("width", width, 1, 16384, integer=True)
        check_number("height", height, 1, 16384, integer=True)
        return int(height), int(width)
    return imaging.aspect_preset_size(aspect, base_size, multiple)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-domain latents
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class JodiLatent:
    """What the JODI_LATENT socket carries: scaled DC-AE latents of all 8 domains and which of them are present."""

    samples: torch.Tensor  # (B, 8, C, h, w) float32, scaled like the pipeline's output
    roles: torch.Tensor  # (B, 8) int64; IGNORE marks a domain that holds no content
    height: int  # output size in pixels the maps are decoded to
    width: int

    def __post_init__(self):
        samples = self.samples
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != NUM_DOMAINS:
            shape = tuple(self.samples.shape) if isinstance(self.samples, torch.Tensor) else type(self.samples)
            raise ValueError(f"A Jodi latent must be shaped (B, {NUM_DOMAINS}, C, h, w), got {shape}.")
        self.roles = torch.as_tensor(self.roles, dtype=torch.long).reshape(-1, NUM_DOMAINS)
        if self.roles.shape[0] == 1 and self.samples.shape[0] > 1:
            self.roles = self.roles.repeat(self.samples.shape[0], 1)
        if self.roles.shape[0] != self.samples.shape[0]:
            raise ValueError(f"{self.roles.shape[0]} role rows for a latent batch of {self.samples.shape[0]}.")
        check_number("height", self.height, 1, 1 << 16, integer=True)
        check_number("width", self.width, 1, 1 << 16, integer=True)

    @property
    def batch(self) -> int:
        return self.samples.shape[0]

    def get_ram_usage(self) -> int:
        return self.samples.numel() * self.samples.element_size()

    def present(self) -> list[str]:
        """Domains with content in at least one sample (generated or given as a condition)."""
        return [d for i, d in enumerate(DOMAIN_NAMES) if (self.roles[:, i] != Role.IGNORE).any()]

    def select(self, domain: str) -> torch.Tensor:
        """One domain's latents ``(B, C, h, w)``."""
        i = get_domain(domain).index
        if not (self.roles[:, i] != Role.IGNORE).any():
            raise ValueError(f"This Jodi latent holds no {DOMAIN_NAMES[i]} (the domain was ignored in the run).")
        return self.samples[:, i]

    def replace(self, domain: str, latent: torch.Tensor) -> "JodiLatent":
        """A copy with one domain's latents replaced (broadcast over the batch); the domain is marked present."""
        i = get_domain(domain).index
        expected = tuple(self.samples.shape[2:])
        if latent.dim() == 3:
            latent = latent[None]
        if latent.dim() != 4 or tuple(latent.shape[1:]) != expected:
            raise ValueError(
                f"The {DOMAIN_NAMES[i]} latent is shaped {tuple(latent.shape)}; this Jodi latent needs (B, "
                f"{', '.join(map(str, expected))}). Latents from another model or size do not fit."
            )
        if latent.shape[0] not in (1, self.batch):
            raise ValueError(f"The {DOMAIN_NAMES[i]} latent has batch {latent.shape[0]}; need 1 or {self.batch}.")
        samples = self.samples.clone()
        samples[:, i] = latent.to(samples.dtype)
        roles = self.roles.clone()
        absent = roles[:, i] == Role.IGNORE
        roles[:, i] = torch.where(absent, torch.full_like(roles[:, i], Role.CONDITION), roles[:, i])
        return JodiLatent(samples, roles, self.height, self.width)


# ---------------------------------------------------------------------------------------------------------------------
# Map conventions for other tools (ControlNets, ADE20K-trained models)
# ---------------------------------------------------------------------------------------------------------------------


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
    is_index_image = (x[:, :1] == x).all() and (ids - ids.round()).abs().max() < 1e-3 and ids.max() < len(SEG12_CLASSES)
    if is_index_image and ids.max() > 0:  # an all-black map is the palette's "unlabeled" either way
        return ids.round().long()
    return seg_to_index(imaging.to_model_range(x))


def seg_to_ade150(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jodi-palette segmentation IMAGE -> (IMAGE in the ADE20K-150 palette, ADE20K class map ``(B, H, W)``)."""
    index12 = seg_index_from_image(seg)
    ade = seg12_to_ade150().to(index12.device)[index12]  # (B, H, W) ADE20K ids, 0 = unlabelled
    palette = seg_palette("colors150").to(index12.device) / 255  # (151, 3), row 0 black
    return bchw_to_image(palette[ade].permute(0, 3, 1, 2)), ade


def seg_class_names() -> tuple[str, ...]:
    return SEG12_CLASSES


__all__ = [
    "ROLE_CHOICES", "SAMPLERS", "DTYPE_CHOICES", "ATTENTION_CHOICES", "ASPECT_CHOICES", "ASPECT_AUTO", "ASPECT_CUSTOM",
    "DEMO_MODEL_CHOICE", "MAX_SEED", "LABEL_NAMES", "check_choice", "check_number", "torch_dtype", "image_to_bchw",
    "bchw_to_image", "blank_image", "index_to_index_image", "class_mask", "resolve_role", "JodiRoles",
    "resolve_size", "JodiLatent", "depth_for_controlnet", "flip_normal", "seg12_to_ade150", "seg_index_from_image",
    "seg_to_ade150", "seg_class_names",
]  # fmt: skip
