"""Jodi Annotate Folder node, against the ComfyUI stand-in of test_nodes_unit (tiny stand-in models): it writes the
dataset, reports progress, stops on an interrupt with what is done kept, and the next run resumes; it reads and writes
only inside ComfyUI's input and output directories (and the folders of JODI_ANNOTATE_ROOTS)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_annotate import make_inputs
from test_nodes_unit import pack  # noqa: F401  (the fixture)


def _models(pack):  # noqa: F811
    model = pack.nodes["JodiModelLoader"].execute("tiny.pth", "auto", "torch").result[0]
    vae = pack.nodes["JodiVAELoader"].execute("tiny-ae.safetensors", "auto").result[0]
    return model, vae


@pytest.fixture
def comfy_dirs(pack, tmp_path, monkeypatch):  # noqa: F811
    """ComfyUI's input and output directories (the stand-in folder_paths has none of its own); no extra roots."""
    dirs = {"input": tmp_path / "comfy" / "input", "output": tmp_path / "comfy" / "output"}
    for d in dirs.values():
        d.mkdir(parents=True)
    fp = sys.modules["folder_paths"]
    monkeypatch.setattr(fp, "get_input_directory", lambda: str(dirs["input"]), raising=False)
    monkeypatch.setattr(fp, "get_output_directory", lambda: str(dirs["output"]), raising=False)
    monkeypatch.delenv("JODI_ANNOTATE_ROOTS", raising=False)
    return dirs


def test_annotate_folder_node_writes_resumes_and_interrupts(pack, comfy_dirs):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    schema = node.define_schema()
    assert schema.category == "Jodi/dataset" and all(i.kwargs.get("tooltip") for i in schema.inputs)
    src, out = comfy_dirs["input"] / "in", comfy_dirs["output"] / "out"
    names = make_inputs(src, corrupt=True)
    model, vae = _models(pack)
    interrupt = sys_modules_mm(pack).InterruptProcessingException

    # With batches of one and 2 steps the interrupt check runs 4 times per image (read, batch, each step): the 11th
    # check stops the run inside the third image's sampling, which is dropped and redone by the next run.
    pack.events.interrupt_after = 10
    with pytest.raises(interrupt):
        node.execute(model, vae, str(src), str(out), "depth, seg", 2, 1, 0)
    assert not (out / "metadata.jsonl").exists()
    partial = sum(len(p.read_text().splitlines()) for p in (out / ".annotate").glob("part-*.jsonl"))
    assert partial == 2

    pack.events.interrupt_after = None
    pack.events.progress.clear()
    summary = node.execute(model, vae, str(src), str(out), "depth, seg", 2, 2, 0).result[0]
    assert f"{len(names) - partial} done, {partial} skipped, 2 failed" in summary and str(out) in summary
    recs = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in recs) == sorted(f"image/{n}" for n in names)
    assert all(set(r) == {"image", "info", "annotation_depth", "annotation_seg_12colors", "source_fingerprint"}
               for r in recs)
    assert all((out / r["annotation_depth"]).is_file() for r in recs)
    done, total = pack.events.progress[-1][:2]
    assert done == total == len(names) - partial + 2  # the failures count as finished too
    assert len((out / "errors.jsonl").read_text().splitlines()) == 2


def test_annotate_folder_node_errors(pack, comfy_dirs):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    model, vae = _models(pack)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        node.execute(model, vae, "nope", "out", "all", 2, 1, 0)
    with pytest.raises(ValueError, match="Unknown domain"):
        node.execute(model, vae, ".", "out", "depth, height", 2, 1, 0)
    with pytest.raises(TypeError, match="Load Jodi Model"):
        node.execute(None, vae, ".", "out", "all", 2, 1, 0)
    with pytest.raises(ValueError, match="points outside"):  # relative paths stay inside ComfyUI's output folder
        node.execute(model, vae, ".", "../../elsewhere", "all", 2, 1, 0)
    fingerprint = node.fingerprint_inputs(input_folder=".")
    assert fingerprint != fingerprint  # NaN: never served from the cache, the folders change outside the graph


def sys_modules_mm(pack):  # noqa: F811
    import sys

    return sys.modules["comfy.model_management"]


# ---------------------------------------------------------------------------------------------------------------------
# Only ComfyUI's folders (a shared workflow is untrusted input)
# ---------------------------------------------------------------------------------------------------------------------


def _write_image(path: Path, colour=(200, 30, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 24), colour).save(path)


def test_folders_outside_comfyui_are_refused(pack, comfy_dirs, tmp_path, monkeypatch):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    model, vae = _models(pack)
    private = tmp_path / "private"
    _write_image(private / "secret.png")
    (comfy_dirs["input"] / "photos").mkdir()
    _write_image(comfy_dirs["input"] / "photos" / "a.png")
    for source, target in [
        (str(private), "stolen"),  # an absolute folder of the server, read into output/ (then served by /view)
        ("~", "stolen"),
        ("../../private", "stolen"),
        ("photos", str(tmp_path / "anywhere")),  # a dataset written anywhere the server can write
        ("photos", str(comfy_dirs["input"] / "ds")),  # the input directory is not an output
    ]:
        with pytest.raises(ValueError, match="points outside") as err:
            node.execute(model, vae, source, target, "depth", 2, 1, 0)
        assert "JODI_ANNOTATE_ROOTS" in str(err.value)  # the message says how to allow a folder
    # A symlink inside ComfyUI's folders that leads out of them is followed, then refused.
    os.symlink(private, comfy_dirs["input"] / "link")
    os.symlink(tmp_path, comfy_dirs["output"] / "link")
    with pytest.raises(ValueError, match="points outside"):
        node.execute(model, vae, "link", "stolen", "depth", 2, 1, 0)
    with pytest.raises(ValueError, match="points outside"):
        node.execute(model, vae, "photos", "link/ds", "depth", 2, 1, 0)
    assert not (comfy_dirs["output"] / "stolen").exists() and not (tmp_path / "ds").exists()
    assert not (tmp_path / "anywhere").exists() and not (comfy_dirs["input"] / "ds").exists()
    # Absolute paths inside ComfyUI's folders are fine.
    summary = node.execute(model, vae, str(comfy_dirs["input"] / "photos"), str(comfy_dirs["output"] / "ds"),
                           "depth", 2, 1, 0).result[0]
    assert "1 done" in summary and (comfy_dirs["output"] / "ds" / "image" / "a.png").is_file()
    # The server's own setting allows more folders (never a node input).
    data_disk = tmp_path / "disk"
    monkeypatch.setenv("JODI_ANNOTATE_ROOTS", os.pathsep.join([str(private), str(data_disk)]))
    summary = node.execute(model, vae, str(private), str(data_disk / "ds"), "depth", 2, 1, 0).result[0]
    assert "1 done" in summary and (data_disk / "ds" / "image" / "secret.png").is_file()
    monkeypatch.setenv("JODI_ANNOTATE_ROOTS", "relative/folder")
    with pytest.raises(ValueError, match="not an absolute path"):
        node.execute(model, vae, "photos", "ds", "depth", 2, 1, 0)
    tooltips = {i.id: i.kwargs["tooltip"] for i in node.define_schema().inputs}
    assert "JODI_ANNOTATE_ROOTS" in tooltips["input_folder"] and "JODI_ANNOTATE_ROOTS" in tooltips["output_folder"]


def test_symlinked_files_out_of_the_input_folder_are_skipped(pack, comfy_dirs, tmp_path, caplog):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    model, vae = _models(pack)
    _write_image(tmp_path / "private" / "secret.png")
    photos = comfy_dirs["input"] / "photos"
    _write_image(photos / "a.png")
    os.symlink(photos / "a.png", photos / "inside.png")  # stays in the folder: used
    os.symlink(tmp_path / "private" / "secret.png", photos / "outside.png")
    summary = node.execute(model, vae, "photos", "ds", "depth", 2, 1, 0).result[0]
    out = comfy_dirs["output"] / "ds"
    assert "2 done" in summary and "1 failed" in summary
    assert not (out / "image" / "outside.png").exists() and not (out / "annotation_depth" / "outside.png.jpg").exists()
    assert (out / "image" / "inside.png").is_file()
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == ["image/outside.png"] and "outside the input folder" in errors[0]["error"]
    assert "outside the input folder" in caplog.text  # logged


# ---------------------------------------------------------------------------------------------------------------------
# Captions with a Janus model
# ---------------------------------------------------------------------------------------------------------------------


def test_annotate_folder_node_captions_with_a_janus_model(pack, comfy_dirs):  # noqa: F811
    import numpy as np
    import torch
    from PIL import Image

    from janus_tiny import write_tiny_janus

    write_tiny_janus(pack.models / "Janus-Pro" / "Janus-Tiny", layout="original", seed=0)
    janus = pack.nodes["JanusLoader"].execute("Janus-Tiny", "auto").result[0]
    node = pack.nodes["JodiAnnotateFolder"]
    model, vae = _models(pack)
    src, out = comfy_dirs["input"] / "in", comfy_dirs["output"] / "out"
    _write_image(src / "a.png")
    _write_image(src / "b.png", (20, 160, 40))
    pack.events.loaded.clear()
    summary = node.execute(model, vae, str(src), str(out), "depth", 2, 1, 0, janus, "brief", 5).result[0]
    assert "2 done, 0 skipped, 0 failed" in summary and "2 captioned" in summary
    recs = {r["image"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    for name in ("a.png", "b.png"):  # the Janus Caption node's caption of the same picture, under the folder name
        with Image.open(src / name) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255)[None]
        caption = pack.nodes["JanusCaption"].execute(janus, image, "brief", 5).result[0][0]
        assert recs[f"image/{name}"]["caption"] == {"Janus-Tiny": caption}
        assert (out / recs[f"image/{name}"]["annotation_depth"]).is_file()
    # ComfyUI was asked for Janus (with room for a caption's KV cache) before captions, for Jodi before maps.
    loads = [(patchers, need) for patchers, need in pack.events.loaded]
    assert loads[0][0] == [janus] and loads[0][1] > 0 and [model, vae] in [p for p, _ in loads]
    # Everything is done: nothing is captioned or labelled again; without a Janus model nothing changes.
    assert "0 done, 2 skipped" in node.execute(model, vae, str(src), str(out), "depth", 2, 1, 0, janus).result[0]
    assert "0 done, 2 skipped" in node.execute(model, vae, str(src), str(out), "depth", 2, 1, 0).result[0]
    # Inputs: checked like the Janus Caption node's; optional, so workflows saved without them still run.
    inputs = {i.id: i for i in node.define_schema().inputs}
    assert all(inputs[k].kwargs.get("optional") for k in ("caption_model", "caption_style", "caption_max_tokens"))
    assert inputs["caption_style"].kwargs["default"] == "detailed"
    assert "caption_style must be one of" in node.validate_inputs(caption_style="poem")
    assert "caption_max_tokens" in node.validate_inputs(caption_max_tokens=0)
    assert node.validate_inputs(caption_style="for a Jodi prompt", caption_max_tokens=64) is True
    with pytest.raises(TypeError, match="Janus Loader"):
        node.execute(model, vae, str(src), str(out), "depth", 2, 1, 0, model)
