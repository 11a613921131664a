"""``annotate`` against hostile or careless input (issue 15): paths out of their folders, foreign rows in OUTPUT,
oversized images, turned and 16-bit photos, an OUTPUT that cannot be written, sources replaced after a run.

The demo model on CPU with 2 steps, tiny images and one or two maps, so each test takes a few seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jodi_core import imaging
from jodi_core.jobs import annotate as ann
from jodi_core.jobs.annotate import annotator, output
from test_annotate import FAST, tree

DEPTH = dict(domains=["depth"])


def run(src, out, **kw) -> ann.AnnotateSummary:
    return ann.annotate(ann.AnnotateConfig(input=str(src), output=str(out), **{**FAST, **DEPTH, **kw}))


def write_image(path: Path, size=(40, 24), colour=(200, 30, 30), fmt=None, **save) -> Path:
    """A small picture: a coloured left half, a grey right half (so that turning it shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[:, : w // 2] = colour
    Image.fromarray(arr).save(path, fmt, **save)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` pixels in a few bytes (what a decompression bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}


def errors(out: Path) -> dict[str, str]:
    return {e["image"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}


def files_outside(root: Path, inside: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if not (root / k).is_relative_to(inside)}


# ---------------------------------------------------------------------------------------------------------------------
# A hostile metadata.jsonl: every path stays inside its folder, nothing is written outside OUTPUT
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def hostile(tmp_path) -> Path:
    """``work/data`` (a Joint layout with a hostile metadata.jsonl) beside files it must not touch."""
    work = tmp_path / "work"
    data = work / "data"
    write_image(data / "image" / "good.png")
    write_image(data / "image" / "b.png")
    write_image(data / "image" / "c.png")
    write_image(work / "victim.jpg", colour=(10, 200, 10))  # a JPEG outside both folders
    secret = write_image(tmp_path / "secret.png", colour=(1, 2, 3))
    secret.chmod(0o600)
    os.symlink(secret, data / "image" / "leak.png")  # symlinks in the dataset that lead out of it
    os.symlink(work / "victim.jpg", data / "image" / "link.jpg")
    rows = [
        {"image": "image/good.png", "caption": "kept"},
        {"image": "../victim.jpg"},
        {"image": str(secret)},
        {"image": "image/../../victim.jpg"},  # in place: its depth map would be written over victim.jpg
        {"image": "image/b.png", "annotation_normal": "../../victim.jpg"},
        {"image": "image/c.png", "annotation_normal": "image/leak.png"},  # would copy the 0600 file into OUTPUT
        {"image": "image/link.jpg"},
    ]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("in_place", [False, True], ids=["into-another-folder", "in-place"])
def test_hostile_metadata_paths_go_to_errors_and_nothing_is_written_outside(hostile, in_place):
    work = hostile.parent
    out = hostile if in_place else work / "out"
    before = files_outside(work.parent, out)
    summary = run(hostile / "metadata.jsonl", out, domains=["depth", "normal"])
    assert (summary.done, summary.failed) == (1, 6)
    assert files_outside(work.parent, out) == before  # victim.jpg untouched, no file created outside OUTPUT
    assert set(records(out)) >= {"image/good.png"} and records(out)["image/good.png"]["caption"] == "kept"
    assert (out / records(out)["image/good.png"]["annotation_depth"]).is_file()
    errs = errors(out)
    assert set(errs) == {"../victim.jpg", str(work.parent / "secret.png"), "image/../../victim.jpg", "image/b.png",
                         "image/c.png", "image/link.jpg"}
    assert "outside" in errs["image/c.png"] and "annotation_normal" in errs["image/c.png"]
    secret = (work.parent / "secret.png").read_bytes()
    assert not [p for p in out.rglob("*") if p.is_file() and p.read_bytes() == secret and p.name != "leak.png"]
    # Still refused on the next run, and still nothing outside.
    assert run(hostile / "metadata.jsonl", out, domains=["depth", "normal"]).failed == 6
    assert files_outside(work.parent, out) == before


def test_symlinked_files_out_of_an_input_folder_are_skipped(tmp_path, caplog):
    src = tmp_path / "photos"
    write_image(src / "a.png")
    write_image(tmp_path / "private" / "p.png")
    os.symlink(tmp_path / "private" / "p.png", src / "out.png")
    os.symlink(src / "a.png", src / "same.png")  # inside the folder: fine
    caplog.set_level(logging.WARNING, logger="jodi_core.jobs.annotate")
    summary = run(src, tmp_path / "ds")
    assert (summary.done, summary.failed) == (2, 1)
    assert set(records(tmp_path / "ds")) == {"image/a.png", "image/same.png"}
    assert "symlink" in errors(tmp_path / "ds")["image/out.png"] and "out.png" in caplog.text
    assert not (tmp_path / "ds" / "image" / "out.png").exists()


def test_output_symlinked_out_of_output_is_refused(tmp_path):
    """A label folder in OUTPUT that is a symlink to elsewhere does not carry writes out of OUTPUT."""
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    write_image(src / "a.png")
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "annotation_depth")
    summary = run(src, out)
    assert summary.failed == 1 and not list(elsewhere.iterdir())
    assert "outside the output folder" in errors(out)["image/a.png"]


def test_paths_inside_and_extra_roots():
    from jodi_core.data.joint_dataset import RootGuard, is_inside

    assert is_inside("/a/b/c", "/a/b") and is_inside("/a/b", "/a/b") and not is_inside("/a/b", "/a/b", strict=True)
    assert not is_inside("/a/bc", "/a/b") and not is_inside("/a/b/../c", "/a/b")
    guard = RootGuard("/a/b")
    assert guard.contains("x/y.jpg") and not guard.contains("../b2/y.jpg") and not guard.contains("/etc/passwd")
    assert ann.extra_roots({}) == [] and ann.extra_roots({ann.ROOTS_ENV: f" {os.pathsep}/data/x"}) == [Path("/data/x")]
    with pytest.raises(ValueError, match="JODI_ANNOTATE_ROOTS.*absolute"):
        ann.extra_roots({ann.ROOTS_ENV: "data"})
    assert ann.resolve_inside("/a/b/c/../d", ["/a/b"], "folder") == Path("/a/b/d")
    with pytest.raises(ValueError, match="folder '/a/c' points outside the allowed folders"):
        ann.resolve_inside("/a/c", ["/a/b", "/x"], "folder")


def test_training_reader_refuses_paths_out_of_the_dataset(tmp_path):
    from jodi_core.data.joint_dataset import JointDataset

    write_image(tmp_path / "secret.png")
    write_image(tmp_path / "ds" / "image" / "a.png")
    (tmp_path / "ds" / "metadata.jsonl").write_text(
        json.dumps({"image": "image/a.png", "annotation_depth": "../secret.png"}) + "\n")
    with pytest.raises(ValueError, match="outside the dataset folder"):
        JointDataset(tmp_path / "ds", 32)[0]


# ---------------------------------------------------------------------------------------------------------------------
# An existing metadata.jsonl (and other files) in OUTPUT: what we did not write is kept
# ---------------------------------------------------------------------------------------------------------------------


def test_foreign_rows_and_lines_in_output_are_kept(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png")
    write_image(src / "b.png", colour=(0, 0, 255))
    out.mkdir()
    foreign = [
        b'{"file_name": "x.png", "text": "a cat"}',  # a Hugging Face imagefolder row
        b'not json {',
        b'["a", "list"]',
        b'{"image": 5, "text": "not a path"}',
        b'{"text": "caf\xe9 in latin-1"}',  # not UTF-8
    ]
    (out / "metadata.jsonl").write_bytes(b"\n".join(foreign) + b"\n")
    (out / "errors.jsonl").write_bytes(b'{"note": "from another tool"}\n')
    (out / "README.txt").write_text("my notes")
    run(src, out)
    lines = (out / "metadata.jsonl").read_bytes().splitlines()
    assert [x for x in lines if x in foreign] == foreign  # byte for byte, in their order
    assert sorted(json.loads(x)["image"] for x in lines if x not in foreign) == ["image/a.png", "image/b.png"]
    assert b'{"note": "from another tool"}' in (out / "errors.jsonl").read_bytes().splitlines()
    assert (out / "README.txt").read_text() == "my notes"
    # Running again (nothing to do, then with a new image) keeps them too.
    run(src, out)
    write_image(src / "c.png")
    run(src, out)
    lines = (out / "metadata.jsonl").read_bytes().splitlines()
    assert [x for x in lines if x in foreign] == foreign and len(lines) == len(foreign) + 3
    assert b'{"note": "from another tool"}' in (out / "errors.jsonl").read_bytes().splitlines()


def test_an_unchanged_complete_output_is_not_rewritten(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png")
    run(src, out)
    (out / "metadata.jsonl").write_bytes((out / "metadata.jsonl").read_bytes().replace(b'", "', b'",  "'))
    before = (out / "metadata.jsonl").read_bytes()
    assert run(src, out).skipped == 1
    assert (out / "metadata.jsonl").read_bytes() == before  # our own row, reformatted by hand: left as it is


# ---------------------------------------------------------------------------------------------------------------------
# Oversized and unreadable images
# ---------------------------------------------------------------------------------------------------------------------


def test_oversized_images_go_to_errors_and_the_rest_is_done(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png")
    png_header(src / "bomb.png", 20000, 20000)  # 400 MP: Pillow's own DecompressionBombError
    png_header(src / "big.png", 9000, 9000)  # 81 MP: over annotate's limit, under Pillow's
    for attempt in range(2):  # and every re-run gets through as well
        summary = run(src, out)
        assert (summary.failed, summary.done + summary.skipped) == (2, 1), attempt
        errs = errors(out)
        assert set(errs) == {"image/bomb.png", "image/big.png"}
        assert "too large" in errs["image/bomb.png"] or "MP" in errs["image/bomb.png"]
        assert "81 MP" in errs["image/big.png"] and "67 MP" in errs["image/big.png"]
    assert imaging.MAX_IMAGE_PIXELS == 8192 * 8192


# ---------------------------------------------------------------------------------------------------------------------
# Turned and 16-bit photos
# ---------------------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_and_the_copy_is_upright(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 24, shown turned 90 degrees clockwise: 24 x 40
    write_image(src / "phone.jpg", (40, 24), fmt="JPEG", exif=exif, quality=95)
    run(src, out)
    rec = records(out)["image/phone.jpg"]
    assert rec["info"] == {"height": 40, "width": 24}
    with Image.open(out / rec["annotation_depth"]) as im:
        assert im.size == (24, 40)
    with Image.open(out / "image" / "phone.jpg") as im:
        assert im.size == (24, 40) and im.getexif().get(0x0112, 1) == 1  # written upright
        top = np.asarray(im.convert("RGB"))[:10].mean((0, 1))
    assert top[0] > 150 and top[2] < 90  # the red half is on top once turned clockwise
    assert ann.read_image(src / "phone.jpg").shape == (3, 40, 24)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = ann.read_image(tmp_path / "g16.png")
    assert x.shape == (3, 16, 64) and abs(float(x.mean()) - 0.5) < 0.01  # was 254/255: near-white
    from jodi_core.data.joint_dataset import load_image

    assert abs(float(load_image(tmp_path / "g16.png", (16, 64)).mean())) < 0.02  # [-1, 1]: mid-grey


# ---------------------------------------------------------------------------------------------------------------------
# An OUTPUT that cannot be written: one line naming the folder and the cause, and resumable
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cause", ["ENOSPC", "EACCES"])
def test_unwritable_output_gives_one_line_and_resumes(tmp_path, monkeypatch, caplog, cause):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_image(src / f"{i}.png", colour=(60 * i, 0, 0))
    real = annotator.write_atomic
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            if cause == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, data)

    for module in (annotator, output):
        monkeypatch.setattr(module, "write_atomic", failing)
    caplog.set_level(logging.INFO, logger="jodi_core.jobs.annotate")
    argv = [str(src), str(out), "--steps", "2", "--batch-size", "1", "--threads", "1", "--no-progress",
            "--domains", "depth"]
    assert ann.main_annotate(argv) == 1
    line = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(line) == 1 and "\n" not in line[0].getMessage() and not line[0].exc_info
    msg = line[0].getMessage()
    assert str(out) in msg and cause in msg and ("No space left" in msg or "Permission denied" in msg)
    with pytest.raises(ann.OutputError, match="cannot write to the output folder"):  # what the node shows
        calls.clear()
        run(src, out)
    for module in (annotator, output):
        monkeypatch.setattr(module, "write_atomic", real)
    summary = run(src, out)
    assert summary.done + summary.skipped == 3 and summary.skipped >= 1 and summary.failed == 0
    assert set(records(out)) == {f"image/{i}.png" for i in range(3)}


def test_output_folder_that_cannot_be_created(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if self == tmp_path / "ro" / "out":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    write_image(tmp_path / "in" / "a.png")
    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(ann.OutputError, match=r"ro/out: Permission denied \[EACCES\]"):
        run(tmp_path / "in", tmp_path / "ro" / "out")


# ---------------------------------------------------------------------------------------------------------------------
# Resume by content, not by path alone
# ---------------------------------------------------------------------------------------------------------------------


def test_a_replaced_source_is_done_again(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png", colour=(200, 30, 30))
    write_image(src / "b.png", colour=(30, 30, 200))
    run(src, out, domains=["depth", "normal"])
    old = tree(out)
    # b.png replaced by another picture of the same name (and size): its maps are stale.
    st = os.stat(src / "b.png")
    write_image(src / "b.png", colour=(30, 200, 30))
    os.utime(src / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    summary = run(src, out)  # only depth asked for now; normal was made from the old picture as well
    assert (summary.done, summary.skipped) == (1, 1)
    new = tree(out)
    assert new["image/b.png"] == (src / "b.png").read_bytes()
    assert new["annotation_depth/b.png.jpg"] != old["annotation_depth/b.png.jpg"]
    assert new["annotation_normal/b.png.jpg"] != old["annotation_normal/b.png.jpg"]
    assert all(new[k] == old[k] for k in old if "/a.png" in k)
    assert records(out)["image/b.png"][ann.FINGERPRINT_KEY] == ann.fingerprint(src / "b.png")
    # Touched but not changed (a copy without times): the content decides, nothing is redone.
    os.utime(src / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert run(src, out).skipped == 2
