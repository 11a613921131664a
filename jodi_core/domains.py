"""The 8 Jodi domains: one registry, their roles, post-processing and condition pre-processing.

Domain order is the official one (``configs/inference.yaml: conditions``) and indexes dim 1 of every latent stack
``(B, 8, 32, h, w)``. Post-processors take decoded images in [-1, 1] shaped ``(B, 3, H, W)`` and return [0, 1]
images, exactly as the reference ``model/postprocess`` classes do.
"""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

_ASSETS = Path(__file__).parent / "assets"


class Role(enum.IntEnum):
    """What the model does with a domain in one forward pass."""

    GENERATE = 0  # denoised from noise
    CONDITION = 1  # the clean latent is given
    IGNORE = 2  # absent: zero tokens whose keys drop out of attention

    @classmethod
    def parse(cls, value: "Role | int | str") -> "Role":
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            key = value.strip().upper()
            if key in cls.__members__:
                return cls[key]
            raise ValueError(f"Unknown role {value!r}; expected one of generate, condition, ignore (or 0, 1, 2).")
        if isinstance(value, bool) or int(value) != value or int(value) not in (0, 1, 2):
            raise ValueError(f"Role {value!r} is outside {{0, 1, 2}} (0 = generate, 1 = condition, 2 = ignore).")
        return cls(int(value))


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing (decoded [-1, 1] -> displayable [0, 1]); each matches the reference post-processor of its domain.
# ---------------------------------------------------------------------------------------------------------------------


# Post-processing runs at the output size (up to 8192 x 8192 in the nodes), so it keeps its temporaries to a few
# copies of the output image: in-place arithmetic on fresh tensors, and the segmentation search done in chunks.


def _check_range(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Post-processing expects (B, 3, H, W) images, got shape {tuple(x.shape)}.")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)  # one pass, no mask the size of the image; NaN propagates into both
    if torch.isnan(lo) or torch.isnan(hi):
        raise ValueError("Post-processing got NaN values; the decoded images are invalid.")
    if lo < -1 or hi > 1:
        raise ValueError(
            f"Post-processing expects values in [-1, 1], got [{lo.item():.4g}, {hi.item():.4g}]; "
            "clamp decoded images first."
        )


def postprocess_rgb(x: torch.Tensor) -> torch.Tensor:
    """image, albedo, openpose: ``(x + 1) / 2``."""
    _check_range(x)
    return (x + 1).div_(2)


def postprocess_gray(x: torch.Tensor) -> torch.Tensor:
    """lineart, edge: channel mean, to [0, 1], repeated to 3 channels."""
    _check_range(x)
    return x.mean(dim=1, keepdim=True).add_(1).div_(2).repeat(1, 3, 1, 1)


def postprocess_depth(x: torch.Tensor) -> torch.Tensor:
    """depth: channel mean, min-max normalised per sample, repeated to 3 channels.

    The reference divides by ``max - min`` and returns NaN for a constant map; we return mid-grey (0.5) there instead,
    which is what its intent (a normalised map) gives in the limit of a vanishing range.
    """
    _check_range(x)
    m = x.mean(dim=1, keepdim=True)
    lo = m.amin(dim=(1, 2, 3), keepdim=True)
    hi = m.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.full_like(m, 0.5))
    return out.repeat(1, 3, 1, 1)


def postprocess_normal(x: torch.Tensor) -> torch.Tensor:
    """normal: unit vectors over channels (eps 1e-12, so zero vectors give 0.5), then to [0, 1]."""
    _check_range(x)
    return F.normalize(x, p=2, dim=1).add_(1).div_(2)


@functools.lru_cache(maxsize=None)
def _palettes() -> dict:
    with open(_ASSETS / "palettes.json") as f:
        return json.load(f)


def seg_palette(scheme: str = "colors12") -> torch.Tensor:
    """Palette as float32 RGB in 0..255: ``colors12`` (12 Jodi classes) or ``colors150`` (black + 150 ADE20K)."""
    p = _palettes()
    if scheme == "colors12":
        return torch.tensor(p["colors12"], dtype=torch.float32)
    if scheme == "colors150":
        return torch.tensor([[0, 0, 0]] + p["colors150"], dtype=torch.float32)
    raise ValueError(f"Unknown segmentation palette {scheme!r}; expected 'colors12' or 'colors150'.")


SEG12_CLASSES = (
    "unlabeled", "person", "animal", "plant", "water", "mountain",
    "sky", "building", "vehicle", "wall", "road", "furniture",
)  # fmt: skip


def ade150_to_seg12() -> torch.Tensor:
    """Index map (151,) from ADE20K classes (0 = unlabelled) to the 12 Jodi classes."""
    return torch.tensor(_palettes()["map150to12"], dtype=torch.long)


# The nearest-colour search holds a (pixels, palette, 3) float32 difference and its square: 288 bytes per pixel for
# the 12 colours, 3.6 kB for the 151 of ADE20K. Whole images of 8192 x 8192 would need 18 GB; chunks of about this
# many bytes keep it small whatever the size.
SEG_CHUNK_BYTES = 32 << 20


def _seg_chunks(height: int, width: int, colours: int) -> tuple[int, int]:
    """(rows, columns) of a chunk: whole rows while they fit :data:`SEG_CHUNK_BYTES`, else part of one row."""
    pixels = max(1, SEG_CHUNK_BYTES // (colours * 3 * 4 * 2))
    if pixels >= width:
        return min(height, pixels // width), width
    return 1, pixels


def seg_to_index(x: torch.Tensor, scheme: str = "colors12") -> torch.Tensor:
    """Nearest palette colour by squared RGB distance on ``(x + 1) / 2 * 255``; ties take the first index.

    Returns the class-index map ``(B, H, W)`` int64. Computed chunk by chunk with the reference's expression, so
    the result is the same as over the whole image, ties included.
    """
    _check_range(x)
    palette = seg_palette(scheme).to(x.device)
    B, _, H, W = x.shape
    index = torch.empty(B, H, W, dtype=torch.long, device=x.device)
    rows, cols = _seg_chunks(H, W, palette.shape[0])
    for b in range(B):
        for top in range(0, H, rows):
            for left in range(0, W, cols):
                chunk = x[b : b + 1, :, top : top + rows, left : left + cols]
                rgb = ((chunk.float() + 1) / 2 * 255).permute(0, 2, 3, 1)  # (1, h, w, 3)
                dist = ((rgb[..., None, :] - palette) ** 2).sum(-1)  # (1, h, w, P)
                index[b : b + 1, top : top + rows, left : left + cols] = dist.argmin(dim=-1)
    return index


def index_to_seg(index: torch.Tensor, scheme: str = "colors12") -> torch.Tensor:
    """Class-index map ``(B, H, W)`` to a palette image ``(B, 3, H, W)`` in [0, 1]."""
    palette = seg_palette(scheme).to(index.device) / 255
    return palette[index].permute(0, 3, 1, 2)


def postprocess_seg(x: torch.Tensor, scheme: str = "colors12") -> torch.Tensor:
    """segmentation: snapped to the palette; the class map is :func:`seg_to_index`."""
    return index_to_seg(seg_to_index(x, scheme), scheme)


# ---------------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    index: int
    dataset_folder: str  # Joint-1.6M layout: ``annotation_<dataset_folder>/`` (``image/`` for the image)
    postprocess: Callable[[torch.Tensor], torch.Tensor]
    description: str

    @property
    def metadata_key(self) -> str:
        return "image" if self.index == 0 else f"annotation_{self.dataset_folder}"


DOMAINS: tuple[Domain, ...] = (
    Domain("image", 0, "image", postprocess_rgb, "the RGB image"),
    Domain("lineart", 1, "lineart", postprocess_gray, "line drawing, dark lines on white"),
    Domain("edge", 2, "edge", postprocess_gray, "edge map, white edges on black"),
    Domain("depth", 3, "depth", postprocess_depth, "relative depth, near is bright"),
    Domain("normal", 4, "normal", postprocess_normal, "surface normals as RGB"),
    Domain("albedo", 5, "albedo", postprocess_rgb, "shading-free base colour"),
    Domain("segmentation", 6, "seg_12colors", postprocess_seg, "12-class semantic map in the Jodi palette"),
    Domain("openpose", 7, "openpose", postprocess_rgb, "OpenPose skeletons on black"),
)
NUM_DOMAINS = len(DOMAINS)
DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in DOMAINS)
LABEL_NAMES: tuple[str, ...] = DOMAIN_NAMES[1:]
_ALIASES = {"seg": "segmentation", "seg_12colors": "segmentation", "pose": "openpose", "rgb": "image"}


def get_domain(key: "str | int") -> Domain:
    """Look a domain up by name, alias (``seg``, ``seg_12colors``, ``pose``) or index."""
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < NUM_DOMAINS:
            return DOMAINS[key]
        raise ValueError(f"Domain index {key} is outside 0..{NUM_DOMAINS - 1}.")
    name = _ALIASES.get(str(key).strip().lower(), str(key).strip().lower())
    for d in DOMAINS:
        if d.name == name:
            return d
    raise ValueError(f"Unknown domain {key!r}; expected one of {', '.join(DOMAIN_NAMES)}.")


def _rows_for_batch(table: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
    """``table`` as ``batch`` rows: one row is repeated, any other count must match."""
    if batch is None or table.shape[0] == batch:
        return table
    if table.shape[0] != 1:
        raise ValueError(f"Got {table.shape[0]} rows of roles for a batch of {batch}.")
    return table.repeat(batch, 1)


def parse_roles(roles: "Sequence | torch.Tensor", batch: int | None = None) -> torch.Tensor:
    """Validate roles and return them as a ``(B, 8)`` int64 tensor.

    Accepts one row of 8 roles (names, ints or :class:`Role`) or a ``(B, 8)`` table, or a mapping-free tensor.
    A single row is repeated to ``batch`` rows when ``batch`` is given.
    """
    if isinstance(roles, torch.Tensor):
        table = roles.detach().to("cpu")
        if table.dim() == 1:
            table = table[None]
        if table.dim() != 2 or table.shape[1] != NUM_DOMAINS:
            raise ValueError(f"Roles must have {NUM_DOMAINS} entries per sample, got shape {tuple(roles.shape)}.")
        if table.is_floating_point() and not torch.equal(table, table.round()):
            raise ValueError(f"Roles must be integers in {{0, 1, 2}}, got {table.tolist()}.")
        table = table.long()
        bad = ~((table >= 0) & (table <= 2))
        if bad.any():
            raise ValueError(f"Role value {table[bad][0].item()} is outside {{0, 1, 2}} (0 generate, 1 condition, 2 ignore).")
    else:
        rows = list(roles)
        if rows and not isinstance(rows[0], (list, tuple, torch.Tensor)):
            rows = [rows]
        for row in rows:
            if len(row) != NUM_DOMAINS:
                raise ValueError(
                    f"Expected {NUM_DOMAINS} roles (one per domain: {', '.join(DOMAIN_NAMES)}), got {len(row)}."
                )
        table = torch.tensor([[int(Role.parse(r)) for r in row] for row in rows], dtype=torch.long)
    table = _rows_for_batch(table, batch)
    if (table == Role.IGNORE).all(dim=1).any():
        raise ValueError("Every domain is ignored; at least one domain must be generated or given as a condition.")
    if not (table == Role.GENERATE).any(dim=1).all():
        raise ValueError("No domain is set to generate; at least one domain per sample must have the role 'generate'.")
    return table


# ---------------------------------------------------------------------------------------------------------------------
# The role plan of a run, and the standard role rows of the three jobs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RolePlan:
    """Everything a run derives from its roles, derived once (by :meth:`from_table`).

    ``roles`` is the ``(B, 8)`` int64 table on the CPU; the domain tuples are ascending indices over all rows.
    """

    roles: torch.Tensor
    active: tuple[int, ...]  # not ignored in some row: these domains take part in the token sequence
    generated: tuple[int, ...]  # generated in some row: their outputs are computed
    conditioned: tuple[int, ...]  # given as a condition in some row: their images are encoded
    drops_caption: torch.Tensor  # (B,) bool: rows that take the null caption (their image is a condition)
    caption_dropped: bool  # every row drops the caption, so a prompt has no effect (perception)
    use_cfg: bool  # sampling runs a second, unconditional branch

    @property
    def batch(self) -> int:
        return self.roles.shape[0]

    @classmethod
    def from_table(cls, table: torch.Tensor, *, has_prompt: bool = False, cfg_scale: float = 1.0) -> "RolePlan":
        """The plan of a ``(B, 8)`` integer role table, taken as it is (:func:`plan_roles` validates user roles).

        The reference drops the caption of every row whose image is a condition (perception), so CFG runs only with a
        prompt, a scale other than 1, and some row that keeps its caption.
        """
        table = table.detach().to("cpu").long()
        drops_caption = table[:, 0] == Role.CONDITION  # domain 0 is the image
        caption_dropped = bool(drops_caption.all())
        return cls(
            roles=table,
            active=_in_some_row(table != Role.IGNORE),
            generated=_in_some_row(table == Role.GENERATE),
            conditioned=_in_some_row(table == Role.CONDITION),
            drops_caption=drops_caption,
            caption_dropped=caption_dropped,
            use_cfg=has_prompt and cfg_scale != 1.0 and not caption_dropped,
        )


def _in_some_row(hits: torch.Tensor) -> tuple[int, ...]:
    """Indices of the columns of a ``(B, L)`` bool table that hold in at least one row."""
    return tuple(int(d) for d in hits.any(dim=0).nonzero().flatten())


def plan_roles(
    roles: "RolePlan | Sequence | torch.Tensor",
    batch: Optional[int] = None,
    *,
    has_prompt: bool = False,
    cfg_scale: float = 1.0,
) -> RolePlan:
    """The :class:`RolePlan` of a run: user roles are validated by :func:`parse_roles` (a plan is taken as it is),
    one row is repeated to ``batch`` rows, and the guidance decides :attr:`RolePlan.use_cfg`."""
    if isinstance(roles, RolePlan):
        table = _rows_for_batch(roles.roles, batch)
    else:
        table = parse_roles(roles, batch)
    return RolePlan.from_table(table, has_prompt=has_prompt, cfg_scale=cfg_scale)


def joint_roles() -> tuple[Role, ...]:
    """Joint generation: every domain generated."""
    return (Role.GENERATE,) * NUM_DOMAINS


def perception_roles(labels: "Sequence[str]" = LABEL_NAMES) -> tuple[Role, ...]:
    """Perception: the image given as a condition, the named label maps generated, the other labels ignored."""
    wanted = {get_domain(name).index for name in labels}
    return (Role.CONDITION,) + tuple(Role.GENERATE if d.index in wanted else Role.IGNORE for d in DOMAINS[1:])


def controllable_roles(conditions: "Sequence[str]", others: "Role | str" = Role.IGNORE) -> tuple[Role, ...]:
    """Controllable generation: the image generated from the named label maps given as conditions; the other labels
    take the role ``others`` (ignore, or generate along with the image)."""
    given = {get_domain(name).index for name in conditions}
    others = Role.parse(others)
    return (Role.GENERATE,) + tuple(Role.CONDITION if d.index in given else others for d in DOMAINS[1:])


def postprocess(domain: "str | int", x: torch.Tensor) -> torch.Tensor:
    """Post-process decoded images of one domain (clamped to [-1, 1] first)."""
    return get_domain(domain).postprocess(x.float().clamp(-1, 1))


def postprocess_with_index(domain: "str | int", x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A domain's post-processed images from decoded ``x`` in [-1, 1], and for segmentation its class map ``(B, H,
    W)`` (else None): the nearest-colour search runs once for both."""
    d = get_domain(domain)
    if d.postprocess is postprocess_seg:
        index = seg_to_index(x)
        return index_to_seg(index), index
    return d.postprocess(x), None
