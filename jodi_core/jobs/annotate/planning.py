"""Output names and seeds, the records already there, and what is left to do."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ...data.joint_dataset import RootGuard
from ...domains import DOMAINS, get_domain
from .config import AnnotateConfig, WorkItem
from .folders import FINGERPRINT_KEY, IMAGE_SUFFIXES, STATE_DIR

log = logging.getLogger(__name__)


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
        from ...data.joint_dataset import read_metadata

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
