"""Label a folder of images with Jodi perception and write a dataset in the Joint-1.6M layout.

``python -m jodi_core annotate INPUT OUTPUT [options]``; INPUT is a folder of images (jpg, png, webp; searched
recursively) or a ``metadata.jsonl`` in the Joint-1.6M layout whose missing maps are filled in. OUTPUT receives::

    image/<rel>                                  the input image, copied byte for byte
    annotation_<folder>/<rel>[.jpg]              one JPEG per label (``.jpg`` appended when <rel> is not a JPEG)
    annotation_seg_12colors/<rel>.png            the segmentation, snapped to the 12-colour palette (lossless)
    metadata.jsonl                               image, info.height/width, annotation_<folder> paths,
                                                 source_fingerprint (+ input fields)
    errors.jsonl                                 images that could not be read or were refused, with the reason

Images are read upright (EXIF orientation applied; a turned image's copy is written upright) and in any mode (16-bit,
CMYK, transparency...) as 8-bit RGB; one of more than ``imaging.MAX_IMAGE_PIXELS`` pixels (8192 x 8192) goes to
``errors.jsonl``. Every path read from the input (files of a folder, the ``image`` and ``annotation_*`` values of a
metadata.jsonl) must stay inside its root once symlinks are followed, and every path written inside OUTPUT, or that
image goes to ``errors.jsonl``. Rows and lines of an existing metadata.jsonl that this did not write are kept as they
are.

Results do not depend on how the work is split: each image's noise seed is a hash of its path in the output, and
images are batched by aspect bucket and by the set of maps they need. Work is split into deterministic shards
(position ``i`` of the sorted list goes to rank ``i % world``) for torchrun, or spread by Ray Data
(``--engine ray``) as whole batches that the driver plans from the image headers (:func:`plan_batches`), streamed
through a perception stage of model actors (:class:`RayStage`; a caption stage goes before it).

Nothing is lost or written twice: each file is written to a temporary name and renamed; an image counts as done once
its record is appended to the writer's part file (``.annotate/part-*.jsonl``), after all of its files exist. A run
started again reads the records already there, skips what is complete and redoes the rest, and an image whose source
changed since (size, mtime, then SHA-256: ``source_fingerprint``). The part files are merged into ``metadata.jsonl``
at the end (idempotently: records are keyed by image path). An OUTPUT that cannot be written (read-only, full) stops
the run with an :class:`OutputError` that names the folder and the cause; what is finished stays recorded.

With ``--caption-model JANUS_FOLDER`` every image is also captioned by Janus (jodi_core.captioning: the Janus Caption
node's presets, greedy decoding, one image per call, so a caption does not depend on the batch or the shard); the
record gets ``"caption": {"<folder name>": "<text>"}`` beside the captions of other models already there. An image
whose caption under that name exists is done for captions; ``--captions-only`` fills in captions alone, without
loading Jodi. A window of images is captioned first (each caption recorded at once), then labelled; a caption that
fails goes to ``errors.jsonl`` (with ``caption_model``) and the image's maps are written all the same. On one GPU the
two models stay loaded together when they fit, else take turns (:class:`ModelPlacement`). Under Ray the captions are a
stage of their own (:class:`RayCaptioner`, Janus actors) before the perception actors, which never load Janus.

With several workers (torchrun ranks on several nodes, Ray workers on a cluster) OUTPUT must be one shared folder:
every worker writes its own files and part file there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .. import imaging
from ..atomic import copy_atomic, write_atomic
from ..captioning import DEFAULT_MAX_TOKENS, DEFAULT_STYLE, CaptionStopped, caption_style
from ..data.joint_dataset import RootGuard, is_inside
from ..domains import DOMAINS, LABEL_NAMES, get_domain, perception_roles
from ..sampling import Interrupted

log = logging.getLogger(__name__)

__all__ = ["AnnotateConfig", "AnnotateSummary", "Annotator", "OutputError", "annotate", "extra_roots", "main_annotate",
           "plan_work", "merge_outputs", "resolve_inside"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
STATE_DIR = ".annotate"  # part files and per-writer error logs, merged at the end
GRAY_FILE_DOMAINS = frozenset({"depth"})  # written as one-channel JPEGs, as in Joint-1.6M
FINGERPRINT_KEY = "source_fingerprint"  # {size, mtime_ns, sha256} of the source the record's maps were made from
# Server-side setting of the ComfyUI node: more folders it may read and write, beside ComfyUI's input and output.
ROOTS_ENV = "JODI_ANNOTATE_ROOTS"


class Stopped(Exception):
    """Raised inside a run when ``stop_after`` images are done or the caller asked to stop."""


class OutputError(OSError):
    """OUTPUT cannot be written (read-only, full, no permission). The message is one line naming the folder and the
    cause; what was finished stays recorded, so running again resumes."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextlib.contextmanager
def _writing_to(out: Path) -> Iterator[None]:
    """Turn an OSError of writing into ``out`` into an :class:`OutputError`; others (an input that vanished) pass."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        if e.filename is not None and not (is_inside(e.filename, out) or is_inside(out, e.filename)):
            raise
        code = f" [{errno.errorcode[e.errno]}]" if e.errno in errno.errorcode else ""
        cause = f"{e.strerror or e}{code}"
        raise OutputError(e.errno, f"cannot write to the output folder {out}: {cause}. What is finished is kept; "
                                   f"fix this and run again to resume.") from e


# ---------------------------------------------------------------------------------------------------------------------
# Folders a run may use
# ---------------------------------------------------------------------------------------------------------------------


def extra_roots(environ: Optional[dict] = None) -> list[Path]:
    """The folders named by ``JODI_ANNOTATE_ROOTS`` (``os.pathsep``-separated absolute paths), resolved."""
    text = (os.environ if environ is None else environ).get(ROOTS_ENV, "")
    roots = []
    for entry in text.split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        path = Path(os.path.expanduser(entry))
        if not path.is_absolute():
            raise ValueError(f"{ROOTS_ENV}: {entry!r} is not an absolute path; list absolute folders separated by "
                             f"{os.pathsep!r}.")
        roots.append(Path(os.path.realpath(path)))
    return roots


def resolve_inside(path: "str | os.PathLike", roots: Sequence["str | os.PathLike"], what: str = "path",
                   hint: str = "") -> Path:
    """``path`` with its symlinks resolved, or a ValueError naming ``what`` unless it is one of ``roots`` or lies
    inside one (what the core save nodes check, after symlinks)."""
    resolved = Path(os.path.realpath(path))
    if any(is_inside(resolved, root) for root in roots):
        return resolved
    allowed = ", ".join(str(Path(os.path.realpath(r))) for r in roots)
    raise ValueError(f"{what} {str(path)!r} points outside the allowed folders ({allowed}): it resolves to "
                     f"{resolved}.{' ' + hint if hint else ''}")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------------------------------


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
        from ..captioning import caption_name, check_janus_folder

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


# ---------------------------------------------------------------------------------------------------------------------
# Layout: names and seeds
# ---------------------------------------------------------------------------------------------------------------------


def label_path(image_key: str, domain: str) -> str:
    """Output-relative path of one label map of the image at ``image_key`` (``image/<rel>`` or any relative path)."""
    d = get_domain(domain)
    rel = image_key[len("image/"):] if image_key.startswith("image/") else image_key
    if d.name == "segmentation":
        return f"annotation_{d.dataset_folder}/{rel}.png"
    suffix = "" if rel.lower().endswith((".jpg", ".jpeg")) else ".jpg"
    return f"annotation_{d.dataset_folder}/{rel}{suffix}"


def image_seed(key: str, seed: int = 0) -> int:
    """A stable 63-bit seed from the image's output path (independent of the process, batch and shard)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def has_caption(record: dict, name: Optional[str]) -> bool:
    """Whether the record holds a caption under ``name`` (its ``caption`` is a dict of captioner -> text)."""
    captions = record.get("caption")
    return bool(name) and isinstance(captions, dict) and isinstance(captions.get(name), str)


def with_caption(record: dict, name: str, text: str) -> dict:
    """The record with ``caption[name] = text``; other captioners' captions are kept (a plain string caption, as
    some datasets have, is kept under ``"original"``)."""
    captions = record.get("caption")
    if isinstance(captions, str):
        captions = {"original": captions}
    elif not isinstance(captions, dict):
        captions = {}
    return {**record, "caption": {**captions, name: text}}


def _has_label(record: dict, domain: str, root: Path) -> bool:
    rel = record.get(get_domain(domain).metadata_key)
    return isinstance(rel, str) and (root / rel).is_file()


def _parse_line(line: bytes) -> Optional[dict]:
    """A JSON object line as a dict; None for anything else (blank, torn, not UTF-8, not an object)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


def _is_record(rec: Optional[dict]) -> bool:
    """A line this reads as an image record: an object with an ``image`` path. Other lines are kept as they are."""
    return rec is not None and isinstance(rec.get("image"), str)


def _raw_lines(path: Path) -> list[bytes]:
    """The lines of a file as bytes, without their line ends; [] when it does not exist."""
    if not path.is_file():
        return []
    return path.read_bytes().splitlines()


def _read_jsonl(path: Path) -> Iterator[dict]:
    """Objects of a JSON-lines file; a torn last line (a killed writer) and other invalid lines are skipped."""
    for line in _raw_lines(path):
        if not line.strip():
            continue
        rec = _parse_line(line)
        if rec is None:
            log.debug("%s: skipping a torn or invalid line", path)
            continue
        yield rec


def known_records(out: Path) -> dict[str, dict]:
    """Image key -> its record in ``out``: metadata.jsonl (the first row of a key), then the part files oldest first
    (their names start with the launch time). A newer record's fields win; maps that only an older record names are
    kept (a run with other ``--domains`` adds maps, it does not drop the earlier ones)."""
    known: dict[str, dict] = {}
    for r in _read_jsonl(out / "metadata.jsonl"):
        if _is_record(r):
            known.setdefault(r["image"], r)
    for part in sorted((out / STATE_DIR).glob("part-*.jsonl")):
        for r in _read_jsonl(part):
            if _is_record(r):
                known[r["image"]] = {**known.get(r["image"], {}), **r}
    return known


def fingerprint(path: "str | os.PathLike") -> dict:
    """Size, modification time (ns) and SHA-256 of a file: what a record says about the source of its maps."""
    with open(path, "rb") as f:
        return _fingerprint_open(f)


def _fingerprint_open(f) -> dict:
    st = os.fstat(f.fileno())
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    f.seek(0)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def source_changed(record: dict, path: "str | os.PathLike") -> bool:
    """Whether the file at ``path`` differs from the one the record's maps were made from: a different size, or (when
    the modification time differs too, e.g. after a copy) different content. A record without a fingerprint (made
    elsewhere or by an older version) is taken as is."""
    fp = record.get(FINGERPRINT_KEY)
    if not isinstance(fp, dict):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False  # reading it will fail and say why
    if st.st_size != fp.get("size"):
        return True
    if st.st_mtime_ns == fp.get("mtime_ns"):
        return False
    try:
        return fingerprint(path)["sha256"] != fp.get("sha256")
    except OSError:
        return False


def part_name(worker: str, stamp: Optional[int] = None) -> str:
    """Name of one launch's part and error files: the launch time first (``stamp``, ns; default now), so that sorting
    the names sorts by age. Writers of one launch given the same ``stamp`` sort by ``worker`` (the Ray engine: the
    caption stage's records before the perception stage's, as they are written in one process)."""
    stamp = time.time_ns() if stamp is None else int(stamp)
    return f"{stamp:020d}-{worker}-{uuid.uuid4().hex[:6]}"


def _list_images(folder: Path, skip: Optional[Path]) -> list[Path]:
    """Image files under ``folder``, sorted; hidden entries, ``skip`` (the output when it lies inside the input) and
    top-level ``annotation_*`` folders (labels of a Joint-1.6M layout input) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if skip is not None and (here.resolve() == skip or skip in here.resolve().parents):
            dirnames[:] = []
            continue
        top = here == folder
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (top and d.startswith("annotation_"))
        )
        found += [here / f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return sorted(found)


def _refusal(key: str, path: Path, record: dict, guards: dict, record_root: Path, out: Path) -> str:
    """Why this image must not be touched ('' when it may): a path read from the input that resolves outside its
    folder (absolute, "..", a symlink out), or a path to write that would land outside OUTPUT."""
    src_guard, out_guard = guards["input"], guards["output"]
    path = os.path.abspath(path)
    if not src_guard.contains(path):
        return (f"the image resolves to {src_guard.resolve(path)}, outside the input folder {src_guard.root} "
                f"(an absolute path, '..' or a symlink out of it); skipped")
    label_guard = out_guard if Path(record_root) == out else src_guard
    for d in DOMAINS[1:]:
        rel = record.get(d.metadata_key)
        if isinstance(rel, str) and not label_guard.contains(rel):
            return f"{d.metadata_key} {rel!r} resolves outside its folder {label_guard.root}; skipped"
        if isinstance(rel, str) and not out_guard.contains(rel):
            return f"{d.metadata_key} {rel!r} would be written outside the output folder {out_guard.root}; skipped"
    for rel in [key] + [label_path(key, d.name) for d in DOMAINS[1:]]:
        if not out_guard.contains(rel):
            return f"{rel!r} would be written outside the output folder {out_guard.root}; skipped"
    if os.path.isdir(out_guard.resolve(key)):
        return f"{key!r} names a folder, not an image file; skipped"
    return ""


def plan_work(cfg: AnnotateConfig, rank: int = 0, world: int = 1) -> tuple[list[WorkItem], int]:
    """The images of shard ``rank`` of ``world`` that still need labels, sorted by key, and how many of the shard's
    images are complete. The shard is cut from the full sorted list *before* completed images are left out, so ranks
    that start at different times (and see different progress) still agree on who owns what. Images refused for a
    path outside its folder come back with ``error`` set."""
    src, out = Path(cfg.input), Path(cfg.output)
    known = known_records(out)
    items, complete = [], 0
    if src.is_dir():
        root = src
        skip = out.resolve() if out.resolve() != src.resolve() else None
        entries = []
        for path in _list_images(src, skip):
            rel = path.relative_to(src).as_posix()
            key = rel if src.resolve() == out.resolve() else f"image/{rel}"
            entries.append((key, path, {"image": key}, src if key == rel else None))
    elif src.is_file():
        from ..data.joint_dataset import read_metadata

        root = src.parent
        entries = [(r["image"], root / r["image"], r, root) for r in read_metadata(src)]
    else:
        raise FileNotFoundError(f"Input not found: {src} (a folder of images or a metadata.jsonl).")
    guards = {"input": RootGuard(root), "output": RootGuard(out)}
    in_place_root = out.resolve()
    counts = collections.Counter(e[0] for e in entries)
    if counts and max(counts.values()) > 1:
        dup = next(k for k, n in counts.items() if n > 1)
        raise ValueError(f"{src}: the image {dup!r} is listed twice.")
    entries = shard(sorted(entries, key=lambda e: e[0]), rank, world)
    for key, path, base, base_root in entries:
        record = known.get(key)
        record_root = out
        if record is None:
            record, record_root = dict(base), (base_root or out)
        refusal = _refusal(key, path, record, guards, Path(record_root), out)
        if refusal:
            items.append(WorkItem(key, str(path), record, (), [], error=refusal))
            continue
        # Captions-only runs do not look at source changes: they leave the maps (and the fingerprint) to a run
        # that makes maps, which then makes the caption again too.
        changed = not cfg.captions_only and source_changed(record, path)
        caption = cfg.captions and (changed or not has_caption(record, cfg.caption_name))
        if cfg.captions_only:
            todo, recopy = (), False
            if not caption and (out / key).is_file():
                complete += 1
                continue
        elif changed:  # every map of the old source is stale: make them all again
            named = [d.name for d in DOMAINS[1:] if isinstance(record.get(d.metadata_key), str)]
            todo = tuple(cfg.domains) + tuple(n for n in named if n not in cfg.domains)
            recopy = Path(path).resolve() != (out / key).resolve()
        else:
            todo = tuple(d for d in cfg.domains if not _has_label(record, d, record_root))
            recopy = False
            if not todo and not caption and (out / key).is_file():
                complete += 1
                continue
        copies = []
        if Path(record_root).resolve() != in_place_root:  # bring the image and the labels already made along
            copies.append((str(path), key))
            for d in DOMAINS[1:]:
                if d.name not in todo and _has_label(record, d.name, Path(record_root)):
                    copies.append((str(Path(record_root) / record[d.metadata_key]), record[d.metadata_key]))
        elif recopy or not (out / key).is_file():
            copies.append((str(path), key))
        items.append(WorkItem(key, str(path), record, todo, copies, caption=caption))
    items.sort(key=lambda it: it.key)
    return items, complete


def shard(items: Sequence, rank: int, world: int) -> list:
    """Position ``i`` goes to rank ``i % world``: disjoint, complete and the same on every rank."""
    return list(items[rank::world])


# ---------------------------------------------------------------------------------------------------------------------
# Atomic file writes
# ---------------------------------------------------------------------------------------------------------------------


def _encode_image(x: torch.Tensor, fmt: str, gray: bool, quality: int) -> bytes:
    """(3, H, W) [0, 1] -> encoded file bytes."""
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    im = Image.fromarray(arr[..., 0] if gray else arr, "L" if gray else "RGB")
    buf = io.BytesIO()
    if fmt == "PNG":
        im.save(buf, "PNG")
    else:
        im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class PartWriter:
    """Appends complete records (and errors) of one writer to its own files under ``<out>/.annotate``."""

    def __init__(self, out: Path, name: str):
        self.dir = out / STATE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part = self.dir / f"part-{name}.jsonl"
        self.errors = self.dir / f"errors-{name}.jsonl"

    @staticmethod
    def _append(path: Path, rec: dict) -> None:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size:  # a killed writer may have left a torn line: start on a fresh one
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def done(self, record: dict) -> None:
        self._append(self.part, record)

    def failed(self, key: str, source: str, reason: str, **extra) -> None:
        self._append(self.errors, {"image": key, "source": source, "error": reason, **extra})


def _clears(error: dict, record: dict) -> bool:
    """Whether a record written after an error resolves it: a caption error (``caption_model`` set) only by a record
    with that caption; any other error by any record."""
    name = error.get("caption_model")
    return name is None or has_caption(record, name)


def _rewrite_jsonl(path: Path, records: dict[str, dict], keys: Sequence[str]) -> None:
    """Write the records ``keys`` into the JSON-lines file ``path``, keeping every line that is not one of its image
    records (rows of other tools, such as an imagefolder's ``{"file_name": ...}``, invalid lines, repeated keys)
    byte for byte, after the record it followed; a record that did not change keeps its line as it was. Nothing is
    written when nothing changed."""
    data = path.read_bytes() if path.is_file() else None
    old_lines = data.splitlines() if data else []
    old: dict[str, tuple[bytes, dict]] = {}
    after: dict[Optional[str], list[bytes]] = collections.defaultdict(list)  # key (None: the top) -> lines after it
    prev = None
    for line in old_lines:
        rec = _parse_line(line)
        if _is_record(rec) and rec["image"] not in old:
            old[rec["image"]] = (line, rec)
            prev = rec["image"]
        elif line.strip():
            after[prev].append(line)
    lines = list(after.pop(None, []))
    for k in keys:
        line, rec = old.get(k, (None, None))
        lines.append(line if rec == records[k] else json.dumps(records[k], ensure_ascii=False).encode("utf-8"))
        lines += after.pop(k, [])
    for rest in after.values():  # follows a record no longer listed: kept all the same
        lines += rest
    new = b"".join(line + b"\n" for line in lines)
    if new != data:
        write_atomic(path, new)


def merge_outputs(out: "str | Path", order: Optional[Sequence[str]] = None) -> int:
    """Fold the part files into ``metadata.jsonl`` and the error logs into ``errors.jsonl`` (idempotent; safe to run
    again after a crash). Records keep ``order`` (the input's order) when given, else sorted by image path; lines
    that are not image records are kept as they were. Returns the number of records."""
    out = Path(out)
    records = known_records(out)
    keys = [k for k in (order or []) if k in records]
    keys += sorted(set(records) - set(keys))
    _rewrite_jsonl(out / "metadata.jsonl", records, keys)
    errors = {e["image"]: e for e in _read_jsonl(out / "errors.jsonl") if _is_record(e)}
    state = out / STATE_DIR
    # Launches oldest first: an image's last outcome wins (done clears an earlier error, a later failure adds one).
    launches = sorted({p.name.split("-", 1)[1] for p in state.glob("*.jsonl")
                       if p.name.startswith(("part-", "errors-"))})
    for name in launches:
        errors.update({e["image"]: e for e in _read_jsonl(state / f"errors-{name}") if _is_record(e)})
        for r in _read_jsonl(state / f"part-{name}"):
            if _is_record(r) and r["image"] in errors and _clears(errors[r["image"]], r):
                errors.pop(r["image"])
    if errors or (out / "errors.jsonl").exists():
        _rewrite_jsonl(out / "errors.jsonl", errors, sorted(errors))
    # Everything is in the merged files now; the parts are redundant.
    for path in list(state.glob("part-*.jsonl")) + list(state.glob("errors-*.jsonl")):
        path.unlink(missing_ok=True)
    return len(keys)


# ---------------------------------------------------------------------------------------------------------------------
# Models and the labelling step
# ---------------------------------------------------------------------------------------------------------------------


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def load_models(cfg: AnnotateConfig, device: torch.device):
    """(transformer, vae) on ``device`` in the configured dtype."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.dit is None:
        from .demo import load_demo_models

        dit, vae, _ = load_demo_models(device, dtype)
        return dit.to(device, dtype).eval(), vae.to(device, dtype).eval()
    from ..loading import load_dcae, load_jodi

    return (load_jodi(cfg.dit, dtype=dtype, device=device).eval(),
            load_dcae(cfg.vae, dtype=dtype, device=device).eval())


def load_caption_model(cfg: AnnotateConfig, device: torch.device):
    """The Janus model of ``--caption-model`` on the CPU, in the run's dtype for ``device`` (ModelPlacement moves
    it)."""
    from ..janus import load_janus

    return load_janus(cfg.caption_model, dtype=resolve_dtype(cfg.dtype, device), device="cpu")


def weight_bytes(*modules) -> int:
    """Bytes of the modules' parameters and buffers."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in [*m.parameters(), *m.buffers()])


class ModelPlacement:
    """Where the Jodi models (DiT and DC-AE) and Janus sit during a run's caption and map phases on one device (the
    command line and torchrun; the ComfyUI node leaves this to ComfyUI's model management). Decided once, logged:

    - on a device other than CUDA (the CPU), every model stays on it;
    - with one of the two only (no captions, or ``captions_only``), it stays on the device;
    - with both on CUDA, both stay on the device when its free memory, with the Jodi models loaded, holds Janus's
      weights plus ``margin`` (the larger working memory of the two phases); otherwise they take turns: Janus waits
      on the CPU while maps are made, the Jodi models while captions are written.
    """

    def __init__(self, device: torch.device, jodi: Sequence, janus, margin: int = 0):
        from ..memory import available_memory, format_bytes

        self.device = torch.device(device)
        self.jodi = [m for m in jodi if m is not None]
        self.janus = janus
        self.turns = False
        self.on_device = "jodi"
        if janus is None:
            return
        if self.device.type != "cuda" or not self.jodi:
            janus.to(self.device)
            self.on_device = "both"
            why = "captions only" if not self.jodi else f"{self.device.type}: nothing to move"
            log.info("annotate: %s on %s (%s)", "Janus" if not self.jodi else "Jodi and Janus", self.device, why)
            return
        need = weight_bytes(janus) + int(margin)
        free = available_memory(self.device)
        if free is None or free >= need:
            janus.to(self.device)
            self.on_device = "both"
            log.info("annotate: Jodi and Janus both stay on %s (%s free with Jodi loaded >= Janus %s + working "
                     "memory %s)", self.device, "?" if free is None else format_bytes(free),
                     format_bytes(weight_bytes(janus)), format_bytes(margin))
        else:
            self.turns = True
            log.info("annotate: Jodi and Janus take turns on %s (%s free with Jodi loaded < Janus %s + working "
                     "memory %s): the idle one waits on the CPU between the caption and map phases", self.device,
                     format_bytes(free), format_bytes(weight_bytes(janus)), format_bytes(margin))

    def _swap(self, to_cpu: Sequence, to_device: Sequence, name: str) -> None:
        if not self.turns or self.on_device == name:
            return
        for m in to_cpu:
            m.to("cpu")
        torch.cuda.empty_cache()
        for m in to_device:
            m.to(self.device)
        self.on_device = name

    def captions(self) -> None:
        """Before captions: Janus on the device."""
        self._swap(self.jodi, [self.janus], "janus")

    def maps(self) -> None:
        """Before maps: the Jodi models on the device."""
        self._swap([self.janus], self.jodi, "jodi")


def read_image(path: "str | Path") -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1], upright and 8-bit RGB whatever the file's mode (:func:`imaging.load_rgb8`);
    a ValueError saying why for anything unreadable or larger than ``imaging.MAX_IMAGE_PIXELS``."""
    return read_source(path)[0]


def read_source(path: "str | Path") -> tuple[torch.Tensor, dict]:
    """The image (as :func:`read_image`) and the :func:`fingerprint` of the very bytes it was decoded from."""
    with open(path, "rb") as f:
        fp = _fingerprint_open(f)
        if fp["size"] == 0:
            raise ValueError("cannot read image: empty file (0 bytes)")
        arr = imaging.load_rgb8(f)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255, fp  # (H, W, 3) -> (3, H, W)


def _upright_copy(src: "str | Path") -> Optional[bytes]:
    """The source re-encoded upright when its EXIF orientation turns it, else None (copied byte for byte)."""
    try:
        return imaging.upright_copy(src)
    except Exception as e:  # Pillow cannot re-encode it: the byte copy still shows upright in viewers
        log.warning("annotate: %s: cannot write an upright copy (%s); copied as it is", src, e)
        return None


class Annotator:
    """Holds the pipeline once and labels lists of :class:`WorkItem`, writing their files and records.

    Used as is by the single-process and torchrun engines, and wrapped by the Ray engine's per-worker class.
    ``on_progress(n)`` is called after each batch with the number of images finished (done or failed). Encoding and
    writing the maps runs on one background thread (in order), overlapping the next batch's sampling; :meth:`run`
    returns only once every record of its items is written. The thread is made once and lives until :meth:`close`
    (``run(..., close=False)`` keeps it for the next call: a Ray worker runs one batch per call).
    """

    MAX_PENDING_BATCHES = 2  # bounds the maps held in memory while the writer catches up

    def __init__(self, cfg: AnnotateConfig, writer_name: str, *, models=None, device: Optional[torch.device] = None,
                 should_stop: Optional[Callable[[], bool]] = None, janus=None, placement=None):
        from ..pipeline import JodiPipeline

        self.cfg = cfg
        self.out = Path(cfg.output)
        from ..loading import resolve_device  # on use: the ComfyUI node imports this module for its path checks

        self.device = device or resolve_device(cfg.device)
        self.pipe = self.resolution = None
        if not cfg.captions_only:
            dit, vae = models if models is not None else load_models(cfg, self.device)
            self.pipe = JodiPipeline(dit, vae)
            self.resolution = int(cfg.resolution or self.pipe.base_size)
        self.captioner = None
        if cfg.captions:
            self._setup_captions(janus, placement, should_stop)
        elif placement is not None:
            self.placement = placement
        else:
            self.placement = ModelPlacement(self.device, [], None)
        with _writing_to(self.out):
            self.writer = PartWriter(self.out, writer_name)
        self._out_guard = RootGuard(self.out)
        self.should_stop = should_stop
        self.done = self.failed = 0
        self.captioned = self.captions_failed = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: collections.deque = collections.deque()

    def _fail(self, item: WorkItem, reason: str) -> None:
        log.warning("annotate: %s failed: %s", item.source, reason)
        self.writer.failed(item.key, item.source, reason)
        self.failed += 1

    # ---- captions ---------------------------------------------------------------------------------------------------

    CAPTION_WINDOW = 64  # images captioned before their maps are made (at least 16 batches)

    def _setup_captions(self, janus, placement, should_stop) -> None:
        from ..captioning import Captioner

        cfg = self.cfg
        if janus is None:
            janus = load_caption_model(cfg, self.device)
        self.captioner = Captioner(janus, cfg.caption_style, cfg.caption_max_tokens, seed=cfg.seed,
                                   should_stop=should_stop)
        if placement is None:
            margin = 1 << 30
            margin += janus.kv_cache_bytes(1, janus.prompt_length(self.captioner.question, 1) + cfg.caption_max_tokens)
            if self.pipe is not None:
                margin = max(margin, (1 << 30) + self.pipe.working_memory(
                    cfg.batch_size, perception_roles(cfg.domains), self.resolution, self.resolution, use_cfg=False))
            jodi = [] if self.pipe is None else [self.pipe.transformer, self.pipe.vae]
            placement = ModelPlacement(self.device, jodi, janus, margin)
        self.placement = placement

    def _windows(self, items: Sequence[WorkItem]) -> Iterator[Sequence[WorkItem]]:
        """All items at once, or with captions to write, windows of them: their captions, then their maps."""
        if self.captioner is None or not any(it.caption for it in items):
            yield items
            return
        size = max(self.CAPTION_WINDOW, 16 * self.cfg.batch_size)
        for i in range(0, len(items), size):
            yield items[i : i + size]

    def _caption_window(self, items: Sequence[WorkItem],
                        on_progress: Optional[Callable[[int], None]]) -> list[WorkItem]:
        """Caption the items that need it and record each caption at once (a record with the caption; the maps
        follow in the map phase). Returns the items that still need maps (or, unreadable, an error recorded)."""
        if self.captioner is None or not any(it.caption and not it.error for it in items):
            return list(items)
        self.placement.captions()
        rest = []
        for item in items:
            if not item.caption or item.error:
                rest.append(item)
                continue
            self._check_stop()
            try:
                image, fp = read_source(item.source)
            except (ValueError, OSError):
                rest.append(item)  # the map phase reads it again and records why
                continue
            item.caption = False
            try:
                text = self.captioner.caption(image, item.key)
            except CaptionStopped as e:  # the image is redone by the next run
                raise Stopped() from e
            except Exception as e:  # noqa: BLE001 (one image's failure must not end the run)
                reason = f"caption by {self.cfg.caption_name} failed: {type(e).__name__}: {e}"
                log.warning("annotate: %s: %s", item.source, reason)
                self.writer.failed(item.key, item.source, reason, caption_model=self.cfg.caption_name)
                self.captions_failed += 1
                text = None
            if text is not None:
                item.record = with_caption(item.record, self.cfg.caption_name, text)
                self.captioned += 1
            if item.domains:
                if text is not None:  # recorded now, so that a stopped run keeps it; the maps add to the record
                    self._submit_write(self._caption_record(item, fp), tuple(image.shape[-2:]), {})
                    item.copies = []
                rest.append(item)
                continue
            if text is None and not item.copies:
                self.failed += 1  # nothing to write for it
            else:
                self._submit_write(self._caption_record(item, fp), tuple(image.shape[-2:]), {})
                self.done += 1
            if on_progress:
                on_progress(1)
        return rest

    @staticmethod
    def _caption_record(item: WorkItem, fp: dict) -> WorkItem:
        """A copy of ``item`` to write its record with the caption (before or without its maps). The source's
        fingerprint is updated unless maps of an older source may be in the record: those keep the old one, so
        that a later run still sees the change."""
        old = item.record.get(FINGERPRINT_KEY)
        stale = isinstance(old, dict) and (bool(item.domains) or (old.get("size"), old.get("sha256")) != (
            fp["size"], fp["sha256"]))
        return dataclasses.replace(item, record=dict(item.record), copies=list(item.copies),
                                   fingerprint=None if stale else fp)

    def _maps_window(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]]) -> None:
        if any(it.domains for it in items):
            self.placement.maps()
        self._run(items, on_progress)

    def _check_stop(self) -> None:
        if self.cfg.stop_after is not None and self.done >= self.cfg.stop_after:
            raise Stopped()
        if self.should_stop is not None and self.should_stop():
            raise Stopped()

    def run(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]] = None, *,
            close: bool = True) -> None:
        """Label ``items``: read each, group by (bucket, maps to make), batch, sample, write. With a caption model,
        a window of items at a time is captioned first, then labelled. Every record of ``items`` is in the part file
        when this returns (or raises); ``close=False`` keeps the writer thread for the next call."""
        try:
            for window in self._windows(items):
                self._maps_window(self._caption_window(window, on_progress), on_progress)
        finally:
            try:
                self.flush()
            finally:
                if close:
                    self._end_pool()

    def submit(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]] = None) -> list:
        """Label ``items`` as :meth:`run` does, but return the futures of their writes still running instead of
        waiting for them (the caller waits before it counts the items as recorded): the next batch may sample
        meanwhile. On an exception the writes of the items finished before it are waited for first."""
        try:
            self._run(items, on_progress)
        except BaseException:
            self.flush()
            raise
        pending, self._pending = list(self._pending), collections.deque()
        return pending

    def flush(self) -> None:
        """Wait for the background writes; re-raise the first that failed."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Finish the background writes and end the writer thread (a later :meth:`run` starts a new one)."""
        try:
            self.flush()
        finally:
            self._end_pool()

    def _end_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _submit_write(self, item: WorkItem, size: tuple[int, int], maps: dict[str, torch.Tensor]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jodi-annotate-write")
        self._pending.append(self._pool.submit(self._write, item, size, maps))
        while len(self._pending) > self.MAX_PENDING_BATCHES * self.cfg.batch_size:
            self._pending.popleft().result()

    def _run(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]]) -> None:
        groups: dict[tuple, list] = {}
        for item in items:
            self._check_stop()
            try:
                if item.error:
                    raise ValueError(item.error)
                image, item.fingerprint = read_source(item.source)
            except (ValueError, OSError) as e:
                self._fail(item, str(e))
                if on_progress:
                    on_progress(1)
                continue
            if not item.domains:  # every map exists already; only the files still need copying into the output
                self._write(item, tuple(image.shape[-2:]), {})
                self.done += 1
                if on_progress:
                    on_progress(1)
                continue
            H, W = image.shape[-2:]
            bucket = imaging.snap_to_bucket(H, W, self.resolution, self.pipe.compression)
            group = groups.setdefault((bucket, item.domains), [])
            group.append((item, image))
            if len(group) == self.cfg.batch_size:
                self._run_batch(bucket, item.domains, groups.pop((bucket, item.domains)), on_progress)
        for (bucket, domains), group in list(groups.items()):
            self._check_stop()
            self._run_batch(bucket, domains, group, on_progress)

    @torch.no_grad()
    def _run_batch(self, bucket, domains, group, on_progress) -> None:
        self._check_stop()
        if self.cfg.stop_after is not None:  # never finish more than stop_after images
            group = group[: max(0, self.cfg.stop_after - self.done)]
            if not group:
                raise Stopped()
        work_h, work_w = bucket
        roles = perception_roles(domains)
        cond = torch.stack([imaging.fit_condition(img[None], work_h, work_w, self.cfg.fit)[0] for _, img in group])
        try:
            result = self.pipe(
                roles, work_h, work_w, conditions={"image": cond}, steps=self.cfg.steps, cfg_scale=1.0,
                flow_shift=self.cfg.flow_shift, sampler=self.cfg.sampler, seeds=[image_seed(it.key, self.cfg.seed)
                                                                               for it, _ in group],
                snap_to_bucket=False, decode=False, should_stop=self.should_stop,  # stop between steps, too
            )
        except Interrupted as e:  # the batch is dropped; it is redone by the next run
            raise Stopped() from e
        maps = self._decode(result.latents, domains, [tuple(img.shape[-2:]) for _, img in group])
        for i, (item, image) in enumerate(group):
            self._submit_write(item, tuple(image.shape[-2:]), {name: m[i] for name, m in maps.items()})
            self.done += 1
        if on_progress:
            on_progress(len(group))

    def _decode(self, latents: torch.Tensor, domains, sizes) -> dict[str, list[torch.Tensor]]:
        """Decode each domain as one batch, then resize each sample to its own image size and post-process."""
        from ..ops import compute_dtype  # an fp8-stored VAE computes in its norms' dtype

        vae, pipe = self.pipe.vae, self.pipe
        p = next(vae.parameters())
        out: dict[str, list[torch.Tensor]] = {}
        for name in domains:
            d = get_domain(name)
            z = latents[:, d.index].to(device=p.device, dtype=compute_dtype(vae, p.dtype)) / pipe.scaling_factor
            x = vae.decode(z).float()  # (B, 3, h*f, w*f) in about [-1, 1]
            # resize and post-process on the VAE's device; only the finished maps travel to the CPU
            out[name] = [d.postprocess(imaging.resize(x[i : i + 1], h, w).clamp(-1, 1))[0].cpu()
                         for i, (h, w) in enumerate(sizes)]
        return out

    def _write(self, item: WorkItem, size: tuple[int, int], maps: dict[str, torch.Tensor]) -> None:
        # image and info first, as in Joint-1.6M; the input's other fields (captions, ...) are kept
        record = {"image": item.key, "info": dict(item.record.get("info") or {}), **item.record}
        record["image"] = item.key
        for src, rel in item.copies:
            upright = _upright_copy(src) if rel == item.key else None
            if upright is None:
                copy_atomic(Path(src), self._dest(rel))
            else:  # the maps are upright, so is the image beside them (whatever reads it)
                write_atomic(self._dest(rel), upright)
        for name, x in maps.items():
            rel = label_path(item.key, name)
            seg = name == "segmentation"
            data = _encode_image(x, "PNG" if seg else "JPEG", name in GRAY_FILE_DOMAINS, self.cfg.jpeg_quality)
            write_atomic(self._dest(rel), data)
            record[get_domain(name).metadata_key] = rel
        record["info"] = {**dict(record.get("info") or {}), "height": int(size[0]), "width": int(size[1])}
        if item.fingerprint is not None:
            record[FINGERPRINT_KEY] = item.fingerprint
        self.writer.done(record)  # last: the image counts as done only once every file exists

    def _dest(self, rel: str) -> Path:
        """``OUTPUT/rel``, checked again at write time (plan_work refused such paths already)."""
        if not self._out_guard.contains(rel):
            raise ValueError(f"refusing to write {rel!r} outside the output folder {self.out}")
        return self.out / rel


# ---------------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str = "annotate"):
        self.bar = None
        self.t0 = time.perf_counter()
        self.n = 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)  # tqdm shows img/s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _input_order(cfg: AnnotateConfig) -> Optional[list[str]]:
    src = Path(cfg.input)
    if src.is_file():
        return [r["image"] for r in _read_jsonl(src) if isinstance(r.get("image"), str)]
    return None


def annotate(
    cfg: AnnotateConfig,
    *,
    models=None,
    janus=None,
    placement=None,
    rank: int = 0,
    world: int = 1,
    device: Optional[torch.device] = None,
    any_stopped: Optional[Callable[[bool], bool]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
) -> AnnotateSummary:
    """Label this rank's shard and (rank 0, once every rank is done and none stopped early) merge.
    ``any_stopped(stopped)``: waits for all ranks and says whether any of them stopped (torchrun); without it this is
    the only rank. ``models``: preloaded (transformer, vae); ``janus``: a preloaded caption model (a JanusModel),
    with ``cfg.caption_name`` naming its captions; ``placement``: what moves the models between the caption and map
    phases (default :class:`ModelPlacement`).
    ``on_progress(finished, total)`` after each batch (the ComfyUI node's progress bar)."""
    cfg.validate()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output)
    with _writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    mine, complete = plan_work(cfg, rank, world)
    summary = AnnotateSummary(skipped=complete)
    if mine:
        annotator = Annotator(cfg, part_name(f"rank{rank}"), models=models, device=device,
                              should_stop=should_stop, janus=janus, placement=placement)
        bar = _Progress(len(mine), cfg.progress and rank == 0)

        def progress(n: int) -> None:
            bar(n)
            if on_progress:
                on_progress(bar.n, len(mine))

        try:
            with _writing_to(out):
                annotator.run(mine, progress)
        except Stopped:
            summary.stopped = True
        finally:
            bar.close()
        summary.done, summary.failed = annotator.done, annotator.failed
        summary.captioned, summary.captions_failed = annotator.captioned, annotator.captions_failed
    if any_stopped is not None:
        summary.stopped = any_stopped(summary.stopped)
    if rank == 0 and not summary.stopped:
        with _writing_to(out):
            merge_outputs(out, _input_order(cfg))
    summary.seconds = time.perf_counter() - t0
    return summary


def _annotate_torchrun(cfg: AnnotateConfig) -> AnnotateSummary:
    """One process per rank (``torchrun``); gloo only joins the ranks at the end (and sums their counts), the work
    needs no collectives."""
    import datetime

    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from ..loading import resolve_device

    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A long timeout: ranks may finish their shards far apart, and the barrier only waits for the slowest.
    tdist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
    try:

        def any_stopped(stopped: bool) -> bool:  # also the barrier before rank 0 merges
            flag = torch.tensor([int(stopped)])
            tdist.all_reduce(flag)
            return bool(flag)

        summary = annotate(cfg, rank=rank, world=world, device=device, any_stopped=any_stopped)
        totals = torch.tensor([summary.done, summary.failed, summary.skipped, summary.captioned,
                               summary.captions_failed])
        tdist.all_reduce(totals)
        (summary.done, summary.failed, summary.skipped, summary.captioned,
         summary.captions_failed) = (int(t) for t in totals)
        if summary.stopped and rank == 0:
            log.info("annotate: a rank stopped early; metadata.jsonl is merged by the next complete run")
        return summary
    finally:
        tdist.destroy_process_group()


# Ray Data: the driver plans the work as rows of one sampler batch each (plan_batches) and streams them through stages,
# each a map_batches over its own pool of actors: captioning (RayCaptioner, _caption_stages), then perception
# (RayAnnotator, which writes the files and records). The driver merges the part files at the end.

WORK_COLUMN = "items"  # a work row: one sampler batch, the JSON list of its WorkItem rows


def _aspect_key(item: WorkItem) -> Optional[float]:
    """The aspect bucket of the item's image (a key of ``imaging.ASPECT_BUCKETS``) read from its header; None when
    the item is refused or its header unreadable (it fails in the worker, without sampling)."""
    if item.error:
        return None
    try:
        h, w = imaging.header_size(item.source)
    except (ValueError, OSError):
        return None
    if h <= 0 or w <= 0:
        return None
    return min(imaging.ASPECT_BUCKETS, key=lambda r: abs(r - h / w))


def plan_batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """``items`` cut into sampler batches for workers that get one batch per call: grouped by aspect bucket (read
    from the image headers on a few threads, without the model) and by the maps to make, each group in key order cut
    into runs of ``batch_size``, groups in the order of their first image. These are the batches
    :meth:`Annotator.run` makes of the whole list at once, except that two aspect buckets which round to one bucket
    size (small resolutions) stay apart here. Images that fail (refused, unreadable) and images with nothing to
    sample (only files to copy) are batched apart."""
    items = sorted(items, key=lambda it: it.key)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items))), thread_name_prefix="jodi-annotate-plan") as pool:
        aspects = list(pool.map(_aspect_key, items))
    groups: dict[tuple, list[WorkItem]] = {}
    for item, aspect in zip(items, aspects):
        key = ("fail",) if aspect is None else ("copy",) if not item.domains else ("sample", aspect, item.domains)
        groups.setdefault(key, []).append(item)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


COUNT_COLUMNS = ("done", "failed", "captioned", "captions_failed")  # counts a stage passes on with its rows


def _row_items(batch: dict) -> list[WorkItem]:
    return [WorkItem.from_row(row) for rows in batch[WORK_COLUMN] for row in json.loads(str(rows))]


def _carried(batch: dict) -> dict[str, int]:
    """The counts the stages before this one passed on with the rows of ``batch`` (0 where none)."""
    return {c: int(np.sum(batch[c])) if c in batch else 0 for c in COUNT_COLUMNS}


class RayCaptioner:
    """The caption stage (a Ray Data callable class): Janus loaded once per actor, no Jodi model. Each call captions
    the items of its work rows that need a caption, appends each caption record to the actor's own part file (a
    killed run loses at most the row in flight; a caption that fails goes to the actor's error log and the item's maps
    are still made) and returns once they are written: the rows go on with the items' records holding their caption
    (caption flag cleared, files already copied), plus the counts so far. Items with no maps to make are finished
    here (as in one process); with ``captions_only`` this is the only stage and finishes every item."""

    def __init__(self, cfg_dict: dict, stamp: Optional[int] = None):
        cfg = AnnotateConfig(**cfg_dict).validate()
        cfg.progress = False
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.captions_only = cfg.captions_only
        # captions_only: the Annotator loads no Jodi model; the items' maps are left to the perception stage
        self.annotator = Annotator(dataclasses.replace(cfg, captions_only=True), part_name("ray1-caption", stamp))

    def __call__(self, batch: dict) -> dict:
        ann = self.annotator
        counts = _carried(batch)
        before = {c: getattr(ann, c) for c in COUNT_COLUMNS}
        rows = []
        for text in batch[WORK_COLUMN]:
            items = [WorkItem.from_row(row) for row in json.loads(str(text))]
            try:
                rest = ann._caption_window(items, None)
                if self.captions_only:  # unreadable and copy-only items: recorded here, no maps to make
                    ann._run(rest, None)
                    rest = []
            except Stopped:  # stop_after: the row's remaining items are left to the next run
                rest = []
            ann.flush()  # the row's records are in the part file before its items go on
            rows.append(json.dumps([it.to_row() for it in rest]))
        out = {c: np.array([counts[c] + getattr(ann, c) - before[c]] + [0] * (len(rows) - 1)) for c in COUNT_COLUMNS}
        return {WORK_COLUMN: np.array(rows), **out}


class RayAnnotator:
    """The perception stage (a Ray Data callable class): one model per actor, files written by the actor itself.

    Each call labels its work rows, one sampler batch each, and returns once their records are in the actor's part
    file: a killed run loses at most the batches in flight. Two calls may run at once (``concurrent_calls`` of the
    stage, where Ray supports it): one samples while the other waits for its files, which keeps the writing of one
    batch overlapped with the sampling of the next as in one process; the model takes one batch at a time. The writer
    thread is made once and lives as long as the actor (Ray has no reliable destructor; after a call it has nothing
    left to write). The counts of the stages before it (captions) are added to its own."""

    def __init__(self, cfg_dict: dict, stamp: Optional[int] = None):
        import threading

        cfg = AnnotateConfig(**cfg_dict).validate()
        cfg.progress = False
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.annotator = Annotator(cfg, part_name("ray2-perception" if stamp is not None else "ray", stamp))
        self._model = threading.Lock()  # one batch on the model (and on the annotator's state) at a time

    def __call__(self, batch: dict) -> dict:
        items = _row_items(batch)
        counts = _carried(batch)
        with self._model:
            done0, failed0 = self.annotator.done, self.annotator.failed
            try:
                writes = self.annotator.submit(items)
            except Stopped:
                writes = []
            done, failed = self.annotator.done - done0, self.annotator.failed - failed0
        for write in writes:  # outside the lock: the next batch samples meanwhile
            write.result()
        return {"done": np.array([counts["done"] + done]), "failed": np.array([counts["failed"] + failed]),
                "captioned": np.array([counts["captioned"]]), "captions_failed": np.array([counts["captions_failed"]])}


@dataclass
class RayStage:
    """One stage of the Ray pipeline: ``map_batches`` over the callable class ``fn`` on its own pool of ``workers``
    actors, each holding ``num_gpus`` (a share of a GPU when < 1) and ``num_cpus``; ``batch_size`` work rows per
    call; ``concurrent_calls`` calls at once on each actor (threads: ``fn`` must be thread-safe; 1 where this Ray's
    ActorPoolStrategy cannot run calls concurrently). A stage before perception takes work rows and gives work rows
    (the same items, records updated)."""

    name: str
    fn: type
    kwargs: dict
    workers: int
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 1
    concurrent_calls: int = 1

    def apply(self, ds):
        import inspect

        import ray.data

        pool = {"size": self.workers}
        if self.concurrent_calls > 1 and "enable_true_multi_threading" in inspect.signature(
                ray.data.ActorPoolStrategy).parameters:
            pool.update(max_concurrent_calls_per_actor=self.concurrent_calls, enable_true_multi_threading=True)
        return ds.map_batches(self.fn, fn_constructor_kwargs=self.kwargs, batch_size=self.batch_size,
                              compute=ray.data.ActorPoolStrategy(**pool), num_gpus=self.num_gpus,
                              num_cpus=self.num_cpus, batch_format="numpy")


def _stage_config(cfg: AnnotateConfig) -> dict:
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["domains"] = list(cfg.domains)
    return cfg_dict


def _caption_gpus(cfg: AnnotateConfig, gpus_per_worker: float) -> float:
    """Each actor's GPU share when captions are on: both stages' pools share the GPUs (a caption actor and a
    perception actor on each, as the two models share one GPU in one process), so each takes half the share;
    captions only: the whole share."""
    return gpus_per_worker if cfg.captions_only else gpus_per_worker / 2


def _caption_stages(cfg: AnnotateConfig, gpu: bool, workers: int = 1, gpus_per_worker: float = 1.0,
                    stamp: Optional[int] = None) -> list[RayStage]:
    """The stages that run on the work rows before perception, each with its own actor pool and GPU share: with a
    caption model, :class:`RayCaptioner` on ``workers`` actors, each with Janus (and ``_caption_gpus`` of a GPU),
    which writes each item's caption into its record and passes the rows on; none without one."""
    if not cfg.caption_model:
        return []
    return [RayStage("caption", RayCaptioner, {"cfg_dict": _stage_config(cfg), "stamp": stamp}, workers,
                     num_gpus=_caption_gpus(cfg, gpus_per_worker) if gpu else 0, num_cpus=0 if gpu else 1)]


def _perception_stage(cfg: AnnotateConfig, gpu: bool, workers: int, gpus_per_worker: float,
                      stamp: Optional[int] = None) -> RayStage:
    """The perception stage; its config has no caption model (the caption stage wrote the captions into the
    records), so its actors never load Janus."""
    share = gpus_per_worker if not cfg.caption_model else _caption_gpus(cfg, gpus_per_worker)
    cfg = dataclasses.replace(cfg, caption_model=None, caption_name=None, captions_only=False)
    return RayStage("perception", RayAnnotator, {"cfg_dict": _stage_config(cfg), "stamp": stamp}, workers,
                    num_gpus=share if gpu else 0, num_cpus=0 if gpu else 1, concurrent_calls=2)


def _start_local_ray(ray, num_cpus: int) -> None:
    """A Ray for this run alone: ``num_cpus`` worker slots (the raylet starts that many workers ahead, which become
    the actors), no dashboard, a small object store (the rows are small; the files go straight to OUTPUT). Its
    workers run at the priority of this process: Ray lowers them to niceness 15 to keep its drivers responsive, but
    here they do all the work while the driver only waits, and the single-process and torchrun engines run at normal
    priority too."""
    niceness = "RAY_worker_niceness"  # read by the raylet and the workers it starts, which inherit this environment
    saved = os.environ.get(niceness)
    os.environ.setdefault(niceness, "0")
    try:
        ray.init(num_cpus=num_cpus, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop(niceness, None)


def _annotate_ray(cfg: AnnotateConfig, address: Optional[str] = None, workers: Optional[int] = None, *,
                  gpus_per_worker: float = 1.0, caption_workers: Optional[int] = None) -> AnnotateSummary:
    """Ray Data: the work rows (:func:`plan_batches`) stream through the caption stage (with a caption model:
    ``caption_workers`` :class:`RayCaptioner` actors with Janus each, default as many as perception actors) and the
    perception stage, ``workers`` :class:`RayAnnotator` actors with a Jodi model each (default: one per
    ``gpus_per_worker`` of the cluster's GPUs, or 1 on CPU; with captions both pools share the GPUs, each actor
    taking half of ``gpus_per_worker``); ``captions_only``: the caption stage alone. A Ray already started in this
    process, or the cluster at ``address``, is used as it is; else a local Ray is started for the run. The driver
    merges at the end."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray: install the [scale] extra (ray[data]).") from None
    if not (0 < gpus_per_worker <= 1 or (gpus_per_worker > 1 and gpus_per_worker == int(gpus_per_worker))):
        raise ValueError(f"gpus_per_worker must be a share of one GPU (0 < x <= 1) or a whole number, "
                         f"got {gpus_per_worker!r}.")
    cfg.validate()  # the caption name, among others: plan_work needs it to see the captions already made
    t0 = time.perf_counter()
    out = Path(cfg.output)
    with _writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    items, complete = plan_work(cfg)
    summary = AnnotateSummary(skipped=complete)
    if cfg.captions and not cfg.captions_only and not any(it.caption for it in items):
        cfg = dataclasses.replace(cfg, caption_model=None, caption_name=None)  # every caption exists: no Janus
    maps = not cfg.captions_only
    if items:
        started_here = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS") or None  # a running cluster: join it
        if started_here:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                slots = (max(workers or 1, 1) if maps else 0) + (max(caption_workers or workers or 1, 1)
                                                                  if cfg.caption_model else 0)
                _start_local_ray(ray, slots)
        context = ray.data.DataContext.get_current()
        quiet = {"enable_progress_bars": False, "print_on_execution_start": False}  # this draws its own bar
        saved = {k: getattr(context, k) for k in quiet if hasattr(context, k)}
        try:
            for k in saved:
                setattr(context, k, quiet[k])
            if cfg.device == "auto":
                gpu = bool(ray.cluster_resources().get("GPU", 0))
            else:
                gpu = torch.device(cfg.device).type == "cuda"
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so "auto" resolves, in the worker, to its GPU.
            cfg = dataclasses.replace(cfg, device="auto" if gpu else "cpu")
            if workers is None:
                workers = max(1, int(ray.cluster_resources().get("GPU", 0) / gpus_per_worker)) if gpu else 1
            stamp = time.time_ns()  # one launch: the caption records sort before the maps records of the same image
            stages = _caption_stages(cfg, gpu, max(caption_workers or workers, 1), gpus_per_worker, stamp)
            if maps:
                stages.append(_perception_stage(cfg, gpu, max(workers, 1), gpus_per_worker, stamp))
            ds = ray.data.from_items([{WORK_COLUMN: json.dumps([it.to_row() for it in batch])}
                                      for batch in plan_batches(items, cfg.batch_size)])
            for stage in stages:
                ds = stage.apply(ds)
            bar = _Progress(len(items), cfg.progress)
            for row in ds.iter_rows():
                summary.done += int(row["done"])
                summary.failed += int(row["failed"])
                summary.captioned += int(row["captioned"])
                summary.captions_failed += int(row["captions_failed"])
                bar(int(row["done"]) + int(row["failed"]))
            bar.close()
        finally:
            for k, v in saved.items():
                setattr(context, k, v)
            if started_here:
                ray.shutdown()
    summary.stopped = cfg.stop_after is not None and summary.done + summary.failed < len(items)
    if not summary.stopped:
        with _writing_to(out):
            merge_outputs(out, _input_order(cfg))
    summary.seconds = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jodi_core annotate",
                                description="Label images with Jodi perception into a Joint-1.6M layout folder.")
    p.add_argument("input", help="a folder of images (searched recursively) or a Joint-1.6M metadata.jsonl")
    p.add_argument("output", help="the output folder (may be the input's folder to fill in missing maps)")
    p.add_argument("--dit", help="Jodi DiT checkpoint (default: the embedded demo model)")
    p.add_argument("--vae", help="DC-AE checkpoint (default: the demo DC-AE)")
    p.add_argument("--domains", default="all",
                   help=f"comma-separated labels to produce (default all: {','.join(LABEL_NAMES)})")
    p.add_argument("--resolution", type=int,
                   help="bucket size: images go to the nearest official aspect bucket scaled to this size "
                        "(default: the model's training size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: each rank its LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0, help="mixed into every image's path-derived noise seed")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "euler"])
    p.add_argument("--flow-shift", type=float, default=3.0)
    p.add_argument("--fit", default=imaging.ALIGNED_FIT, choices=list(imaging.CONDITION_FITS),
                   help="stretch (default): each image is resized into its aspect bucket, so the maps line up with "
                        "it exactly; crop: cover and centre-crop as the reference app does (maps of images whose "
                        "aspect ratio is not a bucket's are then shifted near the borders)")
    p.add_argument("--caption-model", metavar="JANUS_FOLDER",
                   help="also caption every image with this Janus / Janus-Pro model folder: each record gets "
                        "\"caption\": {\"<folder name>\": \"<text>\"} (captions of other models are kept)")
    p.add_argument("--caption-style", default=DEFAULT_STYLE, type=_style_arg, metavar="STYLE",
                   help="brief (one sentence), detailed (default) or jodi-prompt (one paragraph for a "
                        "text-to-image prompt; also spelt \"for a Jodi prompt\"); the Janus Caption node's presets")
    p.add_argument("--caption-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"longest caption in tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--captions-only", action="store_true",
                   help="only fill in captions (no Jodi model is loaded; the maps are left as they are)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--stop-after", type=int, help="stop after this many images without merging (tests resuming)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", default="auto", choices=["auto", "local", "ray"],
                   help="auto: torchrun ranks when launched by torchrun, else one process; ray: Ray Data")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray started in-process)")
    p.add_argument("--ray-workers", type=int,
                   help="model replicas, one GPU each on GPU clusters (default: every GPU of the cluster; 1 on CPU)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=1.0,
                   help="GPUs per model replica on GPU clusters: a share such as 0.5 puts two on each GPU (default 1)")
    p.add_argument("--ray-caption-workers", type=int,
                   help="Janus replicas of the caption stage (default: as many as --ray-workers); with captions each "
                        "caption and each perception replica takes half of --ray-gpus-per-worker")
    p.add_argument("--merge-only", action="store_true", help="only merge the part files into metadata.jsonl")
    return p


def _style_arg(text: str) -> str:
    try:
        return caption_style(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    domains = LABEL_NAMES if args.domains.strip().lower() == "all" else [d for d in args.domains.split(",") if d]
    return AnnotateConfig(
        input=args.input, output=args.output, dit=args.dit, vae=args.vae, domains=domains, resolution=args.resolution,
        steps=args.steps, batch_size=args.batch_size, dtype=args.dtype, device=args.device, seed=args.seed,
        sampler=args.sampler, flow_shift=args.flow_shift, fit=args.fit, stop_after=args.stop_after,
        progress=not args.no_progress, threads=args.threads, caption_model=args.caption_model,
        caption_style=args.caption_style, caption_max_tokens=args.caption_max_tokens, captions_only=args.captions_only,
    ).validate()


def main_annotate(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.merge_only:
            with _writing_to(Path(cfg.output)):
                n = merge_outputs(cfg.output, _input_order(cfg))
            log.info("annotate: merged %d records into %s", n, Path(cfg.output) / "metadata.jsonl")
            return 0
        if args.engine == "ray":
            summary = _annotate_ray(cfg, args.ray_address, args.ray_workers,
                                    gpus_per_worker=args.ray_gpus_per_worker,
                                    caption_workers=args.ray_caption_workers)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            summary = _annotate_torchrun(cfg)
        else:
            summary = annotate(cfg)
    except (ValueError, FileNotFoundError) as e:
        log.error("annotate: %s", e)
        return 2
    except OutputError as e:  # one line, no traceback: the folder and the cause
        log.error("annotate: %s", e)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("%s", summary)
    return 3 if summary.stopped else 0
