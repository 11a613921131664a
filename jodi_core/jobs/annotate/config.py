"""The annotate job's configuration, its summary, and one unit of work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ... import imaging
from ...captioning import DEFAULT_MAX_TOKENS, DEFAULT_STYLE, caption_style
from ...data.joint_dataset import is_inside
from ...domains import LABEL_NAMES, get_domain


@dataclass
class AnnotateConfig:
    input: str
    output: str
    dit: Optional[str] = None  # Jodi DiT checkpoint; None: the embedded demo model
    vae: Optional[str] = None  # DC-AE checkpoint; None: the demo DC-AE
    domains: Sequence[str] = LABEL_NAMES  # labels to produce
    resolution: Optional[int] = None  # aspect buckets scaled to this size; None: the model's training size
    steps: int = 20
    batch_size: int = 4
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32
    device: str = "auto"
    seed: int = 0
    sampler: str = "dpmpp_2m"
    flow_shift: float = 3.0
    # into its bucket: "stretch" keeps the maps aligned with the image; "crop": the reference
    fit: str = imaging.ALIGNED_FIT
    jpeg_quality: int = 95
    stop_after: Optional[int] = None  # stop (without merging) once this many images are done, per rank or Ray worker
    progress: bool = True
    threads: Optional[int] = None  # torch CPU threads per process
    # Captions by Janus: each record gets "caption": {caption_name: text}, other captioners' entries are kept.
    caption_model: Optional[str] = None  # a Janus / Janus-Pro model folder
    caption_name: Optional[str] = None  # the key under "caption"; None: the caption model folder's name
    caption_style: str = DEFAULT_STYLE  # a jodi_core.captioning preset (or alias, e.g. "jodi-prompt")
    caption_max_tokens: int = DEFAULT_MAX_TOKENS
    captions_only: bool = False  # fill in captions only: no Jodi model is loaded, the maps are left as they are

    @property
    def captions(self) -> bool:
        """Whether this run writes captions."""
        return bool(self.caption_name or self.caption_model)

    def validate(self) -> "AnnotateConfig":
        self.domains = tuple(dict.fromkeys(get_domain(d).name for d in self.domains))
        if not self.domains or "image" in self.domains:
            raise ValueError(f"domains must be a non-empty list of labels from {', '.join(LABEL_NAMES)}.")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.resolution is not None and (int(self.resolution) != self.resolution or self.resolution < 32):
            raise ValueError(f"resolution must be an integer >= 32, got {self.resolution!r}.")
        if self.fit not in imaging.CONDITION_FITS:
            raise ValueError(f"fit must be one of {', '.join(imaging.CONDITION_FITS)}, got {self.fit!r}.")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}.")
        if self.stop_after is not None and self.stop_after < 0:
            raise ValueError(f"stop_after must be >= 0, got {self.stop_after!r}.")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality!r}.")
        if (self.dit is None) != (self.vae is None):
            raise ValueError("Give both --dit and --vae, or neither (the embedded demo model).")
        self._validate_captions()
        return self

    def _validate_captions(self) -> None:
        from ...captioning import caption_name, check_janus_folder

        self.caption_style = caption_style(self.caption_style)
        v = self.caption_max_tokens
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
            raise ValueError(f"caption_max_tokens must be a positive integer, got {v!r}.")
        self.caption_max_tokens = int(v)
        if self.caption_model is not None:
            if not isinstance(self.caption_model, (str, os.PathLike)) or not str(self.caption_model).strip():
                raise ValueError(f"caption_model must be a Janus model folder, got {self.caption_model!r}.")
            folder = check_janus_folder(self.caption_model, "--caption-model")
            if folder == Path(os.path.realpath(self.output)) or is_inside(folder, self.output):
                raise ValueError(f"--caption-model {self.caption_model!r} lies inside the output folder "
                                 f"{self.output}; keep models outside the dataset.")
            self.caption_model = str(self.caption_model)
            self.caption_name = self.caption_name or caption_name(self.caption_model)
        if self.caption_name is not None and (not isinstance(self.caption_name, str) or not self.caption_name.strip()):
            raise ValueError(f"caption_name must be a non-empty string, got {self.caption_name!r}.")
        if self.captions_only and not self.captions:
            raise ValueError("--captions-only needs a caption model (--caption-model JANUS_FOLDER).")


@dataclass
class AnnotateSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped: bool = False
    captioned: int = 0  # captions written
    captions_failed: int = 0  # captions that failed (in errors.jsonl; the image's maps were still written)

    def __str__(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        tail = " (stopped early; run again to finish)" if self.stopped else ""
        captions = (f"; {self.captioned} captioned, {self.captions_failed} captions failed"
                    if self.captioned or self.captions_failed else "")
        return (f"annotate: {self.done} done, {self.skipped} skipped, {self.failed} failed in {self.seconds:.1f} s "
                f"({rate:.2f} images/s){captions}{tail}")


@dataclass
class WorkItem:
    """One image to label. ``key`` is the image's path in the output (the metadata's ``image`` field)."""

    key: str
    source: str  # where to read the image
    record: dict  # the record so far (input fields, labels already present)
    domains: tuple  # labels to make
    copies: list = field(default_factory=list)  # (source file, output-relative path) to copy into the output
    error: str = ""  # refused when planned (a path outside its folder): recorded in errors.jsonl, nothing read
    fingerprint: Optional[dict] = None  # of the source as read (set when it is read)
    caption: bool = False  # needs a caption from the run's caption model

    def to_row(self) -> dict:
        return {"key": self.key, "source": self.source, "record": json.dumps(self.record),
                "domains": list(self.domains), "copies": json.dumps(self.copies), "error": self.error,
                "caption": bool(self.caption)}

    @classmethod
    def from_row(cls, row) -> "WorkItem":
        return cls(str(row["key"]), str(row["source"]), json.loads(row["record"]), tuple(row["domains"]),
                   [tuple(c) for c in json.loads(row["copies"])], str(row["error"]),
                   caption=bool(row["caption"]) if "caption" in row else False)
