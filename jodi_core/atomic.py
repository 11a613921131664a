"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it, so that a reader
(or a run started again after a kill) never sees a half-written file. Used by annotate's outputs and by training's
checkpoints and exports."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (for writers that take a file name); when the block
    finishes without an error it is flushed to disk and renamed over ``path``, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_writer(path: "str | os.PathLike") -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_atomic(path: "str | os.PathLike", data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def copy_atomic(src: "str | os.PathLike", dst: "str | os.PathLike") -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
