"""Reader for datasets in the Joint-1.6M layout (the Jodi training set).

Layout::

    root/
      metadata.jsonl              one JSON object per line:
                                    "image": "image/<name>.jpg",
                                    "info": {"height": ..., "width": ...},
                                    "caption": {<captioner>: <text>, ...}   (or a plain string)
                                    "annotation_<folder>": "annotation_<folder>/<name>..."   for each available label
      image/  annotation_lineart/  annotation_edge/  annotation_depth/  annotation_normal/
      annotation_albedo/  annotation_seg_12colors/  annotation_openpose/

Folder names come from ``jodi_core.domains.DOMAINS[i].dataset_folder``. A label whose key is absent from a record is
*missing*: its slot holds zeros and ``available`` is False (training then gives it the role "ignore").

Images are scaled to cover the training size and centre cropped (the same geometry as the reference's condition
preprocessing), then mapped to [-1, 1]. Segmentation maps are resized with nearest-neighbour sampling so that every
pixel keeps an exact palette colour. There is no horizontal flip: it would swap the meaning of the normal map's red
channel and of the OpenPose left/right colours.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..domains import DOMAIN_NAMES, DOMAINS, get_domain
from ..imaging import center_crop, load_rgb8, resize

logger = logging.getLogger(__name__)

_NEAREST_DOMAINS = frozenset({"segmentation"})
_WARNED_KEYS: set = set()  # (dataset folder, caption_key) already warned about


def _as_size(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if len(size) != 2 or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in size):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}.")
    return int(size[0]), int(size[1])


class RootGuard:
    """Says whether paths stay inside ``root`` once resolved (symlinks followed, ``..`` applied), for the many paths
    of one dataset: each directory is resolved once, then each file costs one ``lstat``."""

    def __init__(self, root: Union[str, os.PathLike]):
        self.root = os.path.realpath(root)
        self._dirs: dict[str, str] = {}

    def resolve(self, path: Union[str, os.PathLike]) -> str:
        """``path`` (absolute, or relative to the root) with every symlink resolved."""
        full = os.path.join(self.root, os.fspath(path))
        head, name = os.path.split(full)
        if name in ("", ".", ".."):
            return os.path.realpath(full)
        real_head = self._dirs.get(head)
        if real_head is None:
            real_head = self._dirs[head] = os.path.realpath(head)
        candidate = os.path.join(real_head, name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def contains(self, path: Union[str, os.PathLike], strict: bool = True) -> bool:
        """True when ``path`` resolves to a place below the root (``strict=False``: or the root itself)."""
        resolved = self.resolve(path)
        if resolved == self.root:
            return not strict
        try:
            return os.path.commonpath([resolved, self.root]) == self.root
        except ValueError:  # another drive (Windows)
            return False


def is_inside(path: Union[str, os.PathLike], root: Union[str, os.PathLike], strict: bool = False) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it; ``strict``: below it only."""
    return RootGuard(root).contains(os.path.abspath(path), strict)


def read_metadata(path: Union[str, Path]) -> list[dict]:
    """Parse a ``metadata.jsonl`` file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset metadata not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}).") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise ValueError(f"{path}:{lineno}: each record needs an 'image' path (string).")
            records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no records.")
    return records


def load_image(path: Union[str, Path], size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
    """Load an image file as ``(3, H, W)`` float in [-1, 1], scaled to cover ``size`` and centre cropped."""
    height, width = size
    # A JPEG can decode at 1/2, 1/4, 1/8 scale for free: ask for at least the size we will scale to (not for maps
    # resized with nearest-neighbour sampling, whose values must stay exact).
    arr = load_rgb8(path, cover=None if nearest else (height, width))
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
    ih, iw = x.shape[-2:]
    scale = max(height / ih, width / iw)
    cover = (max(height, round(ih * scale)), max(width, round(iw * scale)))
    if nearest:
        x = F.interpolate(x, size=cover, mode="nearest-exact").float() / 255
    else:
        x = resize(x.float() / 255, *cover)
    x = center_crop(x, height, width)[0]
    return (x * 2 - 1).clamp(-1, 1)


class JointDataset(torch.utils.data.Dataset):
    """Map-style dataset over a Joint-1.6M layout folder.

    Items (the layout shared with the synthetic dataset)::

        pixels     (8, 3, H, W) float in [-1, 1], domains in the official order, zeros where missing
        available  (8,) bool
        caption    str, one captioner's text (chosen by ``caption_key`` or ``caption_weights``; '' when the
                   record has none)
        captions   dict captioner -> text
        index      int

    ``domains`` restricts which labels are read (the others are reported missing). ``caption_key`` picks that
    captioner's caption (``python -m jodi_core annotate --caption-model`` writes them under the model folder's name);
    a record without it (one warning for the dataset) falls back to a random choice among its captions. Otherwise
    ``caption_weights`` maps captioner names to sampling weights (unlisted captioners get weight 0 when any are
    listed), or every captioner is equally likely, as in the reference training. A plain string ``caption`` is
    always that string. The choice is deterministic per ``(seed, epoch, index)``: index the dataset with
    ``(index, epoch)`` (what the trainer's sampler does) or call :meth:`set_epoch` to vary it between epochs.
    """

    def __init__(
        self,
        root: Union[str, Path],
        size: Union[int, Sequence[int]] = 256,
        *,
        domains: Optional[Sequence[str]] = None,
        caption_weights: Optional[Mapping[str, float]] = None,
        caption_key: Optional[str] = None,
        seed: int = 0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Dataset folder not found: {self.root}")
        self.size = _as_size(size)
        self.records = read_metadata(self.root / "metadata.jsonl")
        self._guard = RootGuard(self.root)
        wanted = DOMAIN_NAMES if domains is None else tuple(get_domain(d).name for d in domains)
        if "image" not in wanted:
            wanted = ("image",) + tuple(wanted)
        self.domains = tuple(d for d in DOMAIN_NAMES if d in wanted)
        self.caption_weights = dict(caption_weights) if caption_weights else None
        if self.caption_weights and any(w < 0 for w in self.caption_weights.values()):
            raise ValueError(f"caption_weights must be non-negative, got {self.caption_weights}.")
        if caption_key is not None and (not isinstance(caption_key, str) or not caption_key):
            raise ValueError(f"caption_key must be a captioner name (a non-empty string), got {caption_key!r}.")
        self.caption_key = caption_key
        if caption_key is not None:
            self._warn_missing_key()
        self.seed = seed
        self.epoch = 0

    def _warn_missing_key(self) -> None:
        """One warning (per dataset and key in a process: a run opens the dataset once per stage) for the records
        that lack ``caption_key`` (a plain string caption counts as having it)."""
        def has_key(captions) -> bool:
            return isinstance(captions, str) or (isinstance(captions, dict)
                                                 and isinstance(captions.get(self.caption_key), str))

        missing = [r for r in self.records if not has_key(r.get("caption"))]
        if missing and (str(self.root.resolve()), self.caption_key) not in _WARNED_KEYS:
            _WARNED_KEYS.add((str(self.root.resolve()), self.caption_key))
            logger.warning("%s: caption_key %r is missing from %d of %d records (e.g. %s); they use a caption picked "
                           "at random among their others, or an empty prompt when they have none.",
                           self.root / "metadata.jsonl", self.caption_key, len(missing), len(self.records),
                           missing[0]["image"])

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def available(self, index: int) -> torch.Tensor:
        """``(8,)`` bool: which domains record ``index`` has (restricted to ``domains``)."""
        rec = self.records[index]
        return torch.tensor([d.name in self.domains and isinstance(rec.get(d.metadata_key), str) for d in DOMAINS])

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        if not self._guard.contains(rel):  # an absolute path, "..", or a symlink out of the dataset
            raise ValueError(f"{self.root / 'metadata.jsonl'} refers to {rel!r}, which lies outside the dataset "
                             f"folder {self.root}; every path must stay inside it.")
        if not path.is_file():
            raise FileNotFoundError(f"{self.root / 'metadata.jsonl'} refers to a missing file: {path}")
        return path

    def choose_caption(self, captions, index: int, epoch: Optional[int] = None) -> str:
        if isinstance(captions, str):
            return captions
        if not isinstance(captions, dict) or not captions:
            return ""
        if self.caption_key is not None and isinstance(captions.get(self.caption_key), str):
            return captions[self.caption_key]
        names = sorted(k for k, v in captions.items() if isinstance(v, str))
        if not names:
            return ""
        if self.caption_weights:
            weights = np.array([self.caption_weights.get(n, 0.0) for n in names], dtype=np.float64)
            if weights.sum() <= 0:
                weights = np.ones(len(names))
        else:
            weights = np.ones(len(names))
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), index])
        return captions[names[int(rng.choice(len(names), p=weights / weights.sum()))]]

    def __getitem__(self, index: "int | tuple[int, int]") -> dict:
        """Item ``index``; ``(index, epoch)``: with the caption drawn for that epoch."""
        epoch = None
        if isinstance(index, (tuple, list)):
            index, epoch = index
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)}")
        index = index % len(self)
        rec = self.records[index]
        available = self.available(index)
        H, W = self.size
        pixels = torch.zeros(len(DOMAINS), 3, H, W)
        for d in DOMAINS:
            if available[d.index]:
                pixels[d.index] = load_image(self._path(rec[d.metadata_key]), self.size, d.name in _NEAREST_DOMAINS)
        captions = rec.get("caption", {})
        return {
            "pixels": pixels,
            "available": available,
            "caption": self.choose_caption(captions, index, epoch),
            "captions": captions if isinstance(captions, dict) else {"caption": captions},
            "index": index,
        }


def collate(items: Sequence[dict]) -> dict:
    """Batch items of :class:`JointDataset` or the synthetic dataset (captions stay lists, caption dicts too)."""
    out = {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "available": torch.stack([it["available"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if all("captions" in it for it in items):
        out["captions"] = [it["captions"] for it in items]
    return out
