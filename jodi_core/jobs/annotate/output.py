"""Writing files and records atomically, and merging the part files into metadata.jsonl."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ...atomic import write_atomic
from .folders import STATE_DIR
from .planning import _is_record, _parse_line, _read_jsonl, has_caption, known_records


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
