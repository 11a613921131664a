"""Jodi Annotate Folder node, against the ComfyUI stand-in of test_nodes_unit (tiny stand-in models): it writes the
dataset, reports progress, stops on an interrupt with what is done kept, and the next run resumes."""

from __future__ import annotations

import json

import pytest

from test_annotate import make_inputs
from test_nodes_unit import pack  # noqa: F401  (the fixture)


def _models(pack):  # noqa: F811
    model = pack.nodes["JodiModelLoader"].execute("tiny.pth", "auto", "torch").result[0]
    vae = pack.nodes["JodiVAELoader"].execute("tiny-ae.safetensors", "auto").result[0]
    return model, vae


def test_annotate_folder_node_writes_resumes_and_interrupts(pack, tmp_path):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    schema = node.define_schema()
    assert schema.category == "Jodi/dataset" and all(i.kwargs.get("tooltip") for i in schema.inputs)
    src, out = tmp_path / "in", tmp_path / "out"
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
    assert all(set(r) == {"image", "info", "annotation_depth", "annotation_seg_12colors"} for r in recs)
    assert all((out / r["annotation_depth"]).is_file() for r in recs)
    done, total = pack.events.progress[-1][:2]
    assert done == total == len(names) - partial + 2  # the failures count as finished too
    assert len((out / "errors.jsonl").read_text().splitlines()) == 2


def test_annotate_folder_node_errors(pack, tmp_path):  # noqa: F811
    node = pack.nodes["JodiAnnotateFolder"]
    model, vae = _models(pack)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        node.execute(model, vae, str(tmp_path / "nope"), str(tmp_path / "out"), "all", 2, 1, 0)
    with pytest.raises(ValueError, match="Unknown domain"):
        node.execute(model, vae, str(tmp_path), str(tmp_path / "out"), "depth, height", 2, 1, 0)
    with pytest.raises(TypeError, match="Load Jodi Model"):
        node.execute(None, vae, str(tmp_path), str(tmp_path / "out"), "all", 2, 1, 0)
    with pytest.raises(ValueError, match="points outside"):  # relative paths stay inside ComfyUI's output folder
        node.execute(model, vae, str(tmp_path), "../../elsewhere", "all", 2, 1, 0)
    fingerprint = node.fingerprint_inputs(input_folder=str(tmp_path))
    assert fingerprint != fingerprint  # NaN: never served from the cache, the folders change outside the graph


def sys_modules_mm(pack):  # noqa: F811
    import sys

    return sys.modules["comfy.model_management"]
