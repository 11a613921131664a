"""Constants of the output layout, the run's errors, and the folders a run may use."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ...data.joint_dataset import is_inside


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
