"""Captions in ``python -m jodi_core annotate`` (``--caption-model`` and friends), jodi_core.captioning, and training
on the captions (``caption_key``).

A tiny random Janus folder (tests/janus_tiny.py) writes the captions: its text is noise, but it is the engine's text,
so where captions go, what resumes, what fails and what reaches the text encoder can be checked exactly. Maps use the
demo model on CPU with 2 steps, as in test_annotate.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janus_tiny import write_tiny_janus
from jodi_core import captioning
from jodi_core.captioning import CAPTION_PRESETS, Captioner
from jodi_core.jobs import annotate as ann
from jodi_core.jobs.annotate import annotator, ray_engine

FAST = dict(steps=2, batch_size=1, threads=1, progress=False)
NAME = "Janus-Tiny"
TOKENS = 6


def _make_images(folder: Path, n: int = 3) -> list[str]:
    """``n`` small synthetic scenes as PNGs (two aspect ratios)."""
    from jodi_core.jobs.demo import demo_scene

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = [(48, 48), (40, 64)][i % 2]
        x = torch.nn.functional.interpolate(demo_scene(200 + i, 64)["image"], (h, w), mode="bilinear")[0]
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
        names.append(f"p{i}.png")
    return names


@pytest.fixture(scope="module")
def janus_folder(tmp_path_factory) -> Path:
    return write_tiny_janus(tmp_path_factory.mktemp("models") / NAME, layout="original", seed=0)


@pytest.fixture(scope="module")
def janus(janus_folder):
    from jodi_core.janus import load_janus

    return load_janus(janus_folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("in")
    _make_images(src)
    return src


def run(src, out, janus_folder=None, **kw) -> ann.AnnotateSummary:
    caption = dict(caption_model=str(janus_folder), caption_max_tokens=TOKENS) if janus_folder else {}
    return ann.annotate(ann.AnnotateConfig(input=str(src), output=str(out), **{**FAST, **caption, **kw}))


def records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}


def expected_caption(janus, path: Path, style: str = "detailed", tokens: int = TOKENS) -> str:
    """What the Janus Caption node computes for this image (greedy, stripped, folded for the folding styles)."""
    from jodi_core.janus import janus_understand

    question, fold = CAPTION_PRESETS[style]
    answer = janus_understand(janus, ann.read_image(path)[None], question, max_new_tokens=tokens)[0].strip()
    return captioning.one_line(answer) if fold else answer


@pytest.fixture
def count_calls(monkeypatch):
    """Counts Captioner.caption calls (the Janus calls of a run), by image key."""
    calls: list[str] = []
    real = Captioner.caption

    def spy(self, image, key):
        calls.append(key)
        return real(self, image, key)

    monkeypatch.setattr(Captioner, "caption", spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# jodi_core.captioning
# ---------------------------------------------------------------------------------------------------------------------


def test_styles_aliases_and_folders(janus_folder, tmp_path):
    assert captioning.caption_style("jodi-prompt") == "for a Jodi prompt"
    assert captioning.caption_style("For a Jodi prompt") == "for a Jodi prompt"
    assert captioning.caption_style(" Brief ") == "brief" and captioning.DEFAULT_STYLE == "detailed"
    with pytest.raises(ValueError, match="caption style must be one of"):
        captioning.caption_style("verbose")
    assert captioning.caption_name(str(janus_folder) + "/") == NAME
    assert captioning.check_janus_folder(janus_folder) == janus_folder.resolve()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        captioning.check_janus_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Janus model folder"):
        captioning.check_janus_folder(tmp_path / "empty")
    llama = tmp_path / "llama"
    shutil.copytree(janus_folder, llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not Janus"):
        captioning.check_janus_folder(llama)
    with pytest.raises(ValueError, match="is a file"):
        captioning.check_janus_folder(janus_folder / "config.json")


def test_captioner_is_the_caption_nodes_decoding(janus, images):
    path = images / "p0.png"
    image = ann.read_image(path)
    for style in CAPTION_PRESETS:
        text = Captioner(janus, style, TOKENS).caption(image, "image/p0.png")
        assert text == expected_caption(janus, path, style), style
        if CAPTION_PRESETS[style][1]:
            assert "\n" not in text
    # Greedy: the key's seed changes nothing, so the same pixels give the same caption under any name or seed.
    assert Captioner(janus, "brief", TOKENS, seed=5).caption(image, "x") == Captioner(janus, "brief", TOKENS).caption(
        image, "image/p0.png")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner(janus, "brief", 0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        Captioner(janus, "brief", 4).caption(image[None], "k")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_config_is_checked_and_round_trips(janus_folder, tmp_path):
    cfg = ann.AnnotateConfig(input=str(tmp_path), output=str(tmp_path / "out"), caption_model=str(janus_folder),
                             caption_style="jodi-prompt").validate()
    assert cfg.caption_name == NAME and cfg.caption_style == "for a Jodi prompt" and cfg.captions
    assert cfg.caption_max_tokens == captioning.DEFAULT_MAX_TOKENS
    # What the Ray engine sends its workers: the caption fields travel with the rest.
    d = dataclasses.asdict(cfg)
    assert ann.AnnotateConfig(**json.loads(json.dumps({**d, "domains": list(cfg.domains)}))).validate() == cfg
    item = ann.WorkItem("image/a.png", "/x/a.png", {"image": "image/a.png"}, ("depth",), [], caption=True)
    assert ann.WorkItem.from_row(item.to_row()) == item
    old_row = {k: v for k, v in item.to_row().items() if k != "caption"}  # rows without the field: no caption
    assert ann.WorkItem.from_row(old_row).caption is False

    def bad(**kw):
        return ann.AnnotateConfig(input=str(tmp_path), output=str(tmp_path / "out"), **kw).validate()

    with pytest.raises(FileNotFoundError, match="--caption-model .* does not exist"):
        bad(caption_model=str(tmp_path / "missing"))
    (tmp_path / "not-janus").mkdir()
    with pytest.raises(ValueError, match="not a Janus model folder"):
        bad(caption_model=str(tmp_path / "not-janus"))
    with pytest.raises(ValueError, match="--captions-only needs a caption model"):
        bad(captions_only=True)
    with pytest.raises(ValueError, match="caption style"):
        bad(caption_model=str(janus_folder), caption_style="poem")
    with pytest.raises(ValueError, match="caption_max_tokens"):
        bad(caption_model=str(janus_folder), caption_max_tokens=0)
    inside = tmp_path / "out" / "models" / NAME
    shutil.copytree(janus_folder, inside)
    with pytest.raises(ValueError, match="inside the output folder"):
        bad(caption_model=str(inside))


def test_command_line(janus, janus_folder, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jodi_core.jobs.annotate")
    out = tmp_path / "out"
    argv = [str(images), str(out), "--threads", "1", "--no-progress", "--caption-model", str(janus_folder),
            "--caption-style", "jodi-prompt", "--caption-max-tokens", str(TOKENS), "--captions-only"]
    assert ann.main_annotate(argv) == 0
    recs = records(out)
    assert len(recs) == 3 and "3 captioned" in caplog.text
    for key, rec in recs.items():
        assert rec["caption"] == {NAME: expected_caption(janus, images / key[len("image/"):], "for a Jodi prompt")}
        assert not any(k.startswith("annotation_") for k in rec)
    assert ann.main_annotate(argv[:2] + ["--caption-model", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "does not exist" in caplog.text
    with pytest.raises(SystemExit):
        ann.build_parser().parse_args([str(images), str(out), "--caption-style", "poem"])
    assert "jodi-prompt" in ann.build_parser()._option_string_actions["--caption-style"].help


# ---------------------------------------------------------------------------------------------------------------------
# Annotating with captions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def joint_input(images, tmp_path) -> Path:
    """A Joint-1.6M layout input whose records already hold captions of other captioners (a dict and a string)."""
    root = tmp_path / "joint"
    shutil.copytree(images, root / "image")
    recs = [{"image": "image/p0.png", "caption": {"human": "a small scene"}},
            {"image": "image/p1.png", "caption": "a wide scene"},
            {"image": "image/p2.png"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_captions_are_keyed_by_the_folder_name_and_others_are_kept(janus, janus_folder, joint_input, tmp_path,
                                                                   count_calls):
    out = tmp_path / "out"
    summary = run(joint_input / "metadata.jsonl", out, janus_folder, domains=["depth"])
    assert (summary.done, summary.failed, summary.captioned, summary.captions_failed) == (3, 0, 3, 0)
    assert "3 captioned, 0 captions failed" in str(summary)
    recs = records(out)
    text = {k: expected_caption(janus, joint_input / k) for k in recs}
    assert recs["image/p0.png"]["caption"] == {"human": "a small scene", NAME: text["image/p0.png"]}
    assert recs["image/p1.png"]["caption"] == {"original": "a wide scene", NAME: text["image/p1.png"]}
    assert recs["image/p2.png"]["caption"] == {NAME: text["image/p2.png"]}
    assert all((out / r["annotation_depth"]).is_file() and ann.FINGERPRINT_KEY in r for r in recs.values())
    assert sorted(count_calls) == sorted(recs)
    # Done: nothing to caption or label again. Another captioner adds its key beside this one.
    count_calls.clear()
    assert run(joint_input / "metadata.jsonl", out, janus_folder, domains=["depth"]).skipped == 3
    assert count_calls == []
    other = tmp_path / "Janus-Other"
    shutil.copytree(janus_folder, other)
    summary = run(out / "metadata.jsonl", out, other, domains=["depth"], captions_only=True)
    assert summary.captioned == 3 and len(count_calls) == 3
    for key, rec in records(out).items():
        assert rec["caption"][NAME] == text[key] and rec["caption"]["Janus-Other"] == text[key]


def test_resume_does_not_caption_again(janus_folder, images, tmp_path, count_calls):
    out = tmp_path / "out"
    first = run(images, out, janus_folder, captions_only=True, stop_after=2)
    assert first.stopped and first.done == 2 and len(count_calls) == 2
    assert not (out / "metadata.jsonl").exists()  # stopped early: not merged
    second = run(images, out, janus_folder, captions_only=True)
    assert (second.done, second.skipped) == (1, 2) and len(count_calls) == 3
    assert len(set(count_calls)) == 3  # each image captioned once over both runs
    count_calls.clear()
    # A run that makes maps now: every caption exists, so Janus is not asked again.
    third = run(images, out, janus_folder, domains=["depth"])
    assert third.done == 3 and count_calls == []
    assert all("annotation_depth" in r and NAME in r["caption"] for r in records(out).values())


def test_a_killed_run_keeps_its_finished_captions(janus, janus_folder, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = Captioner.caption
    calls = []

    def dies_on_the_third(self, image, key):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while the third caption is being written
        return real(self, image, key)

    monkeypatch.setattr(Captioner, "caption", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(images, out, janus_folder, domains=["depth"])
    kept = ann.known_records(out)
    assert sorted(kept) == sorted(calls[:2]) and all(NAME in r["caption"] for r in kept.values())
    calls.clear()
    monkeypatch.setattr(Captioner, "caption", lambda self, image, key: (calls.append(key), real(self, image, key))[1])
    summary = run(images, out, janus_folder, domains=["depth"])
    assert calls == [k for k in sorted(records(out)) if k not in kept]  # only the caption that was lost
    assert summary.done == 3 and summary.captioned == 1
    for key, rec in records(out).items():
        assert rec["caption"] == {NAME: expected_caption(janus, images / key[len("image/"):])}
        assert (out / rec["annotation_depth"]).is_file()


def test_captions_only_does_not_load_jodi_and_leaves_the_maps(janus_folder, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(images, out, domains=["depth", "edge"])
    before = records(out)
    maps = {p: p.read_bytes() for p in out.rglob("annotation_*/*") if p.is_file()}
    assert len(maps) == 6

    def no_jodi(*a, **k):
        raise AssertionError("captions-only loaded the Jodi models")

    monkeypatch.setattr(annotator, "load_models", no_jodi)
    monkeypatch.setattr("jodi_core.pipeline.JodiPipeline.__init__", no_jodi)
    summary = run(images, out, janus_folder, captions_only=True)
    assert (summary.done, summary.captioned, summary.failed) == (3, 3, 0)
    assert {p: p.read_bytes() for p in out.rglob("annotation_*/*") if p.is_file()} == maps
    for key, rec in records(out).items():
        assert {k: v for k, v in rec.items() if k != "caption"} == before[key]  # maps, info and fingerprint as were
        assert list(rec["caption"]) == [NAME]


def _caption_fails_for_p1(monkeypatch):
    """Captioner.caption raises for image/p1.png only; returns the real method."""
    real = Captioner.caption

    def fails_for_p1(self, image, key):
        if key == "image/p1.png":
            raise RuntimeError("boom")
        return real(self, image, key)

    monkeypatch.setattr(Captioner, "caption", fails_for_p1)
    return real


def test_a_failed_caption_goes_to_errors_and_the_maps_are_written(janus, janus_folder, images, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "out"
    real = _caption_fails_for_p1(monkeypatch)
    summary = run(images, out, janus_folder, domains=["depth"])
    assert (summary.done, summary.failed, summary.captioned, summary.captions_failed) == (3, 0, 2, 1)
    recs = records(out)
    assert "caption" not in recs["image/p1.png"] and (out / recs["image/p1.png"]["annotation_depth"]).is_file()
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["image"] == "image/p1.png" and errors[0]["caption_model"] == NAME
    assert "caption by Janus-Tiny failed: RuntimeError: boom" in errors[0]["error"]
    # The next run captions it (its maps exist), and the error is cleared.
    monkeypatch.setattr(Captioner, "caption", real)
    summary = run(images, out, janus_folder, domains=["depth"])
    assert (summary.done, summary.skipped, summary.captioned) == (1, 2, 1)
    assert records(out)["image/p1.png"]["caption"] == {NAME: expected_caption(janus, images / "p1.png")}
    assert (out / "errors.jsonl").read_text() == ""
    # A caption error stays while the caption is missing, even once the maps are recorded (a later run without
    # captions does not clear it).
    state = out / ann.STATE_DIR
    (state / "errors-1-x.jsonl").write_text(json.dumps({"image": "image/p0.png", "source": "s", "error": "e",
                                                       "caption_model": "Other"}) + "\n")
    (state / "part-1-x.jsonl").write_text(json.dumps(records(out)["image/p0.png"]) + "\n")
    ann.merge_outputs(out)
    assert [json.loads(x)["image"] for x in (out / "errors.jsonl").read_text().splitlines()] == ["image/p0.png"]


def test_captions_do_not_depend_on_batch_size_or_shards(janus_folder, images, tmp_path):
    out1, out3, sharded = tmp_path / "b1", tmp_path / "b3", tmp_path / "sharded"
    run(images, out1, janus_folder, domains=["depth"], batch_size=1)
    run(images, out3, janus_folder, domains=["depth"], batch_size=3)
    cfg = ann.AnnotateConfig(input=str(images), output=str(sharded), **{**FAST, "batch_size": 2},
                             caption_model=str(janus_folder), caption_max_tokens=TOKENS, domains=["depth"])
    ann.annotate(dataclasses.replace(cfg), rank=1, world=2)  # rank 1 does not merge
    ann.annotate(dataclasses.replace(cfg), rank=0, world=2)
    captions = [{k: r["caption"] for k, r in records(o).items()} for o in (out1, out3, sharded)]
    assert captions[0] == captions[1] == captions[2] and len(captions[0]) == 3


def test_torchrun_two_ranks_write_the_in_process_captions(janus_folder, images, tmp_path):
    from test_annotate import tree
    from test_annotate_scale import TORCHRUN, _cli, _run

    reference = tmp_path / "reference"
    run(images, reference, janus_folder, domains=["depth"])
    out = tmp_path / "torchrun"
    _run(TORCHRUN + ["-m", "jodi_core"] + _cli(images, out, 1) + [
        "--domains", "depth", "--caption-model", str(janus_folder), "--caption-max-tokens", str(TOKENS)])
    assert tree(out) == tree(reference)  # captions, maps and records: batches of one, seeds from the paths


def _stage_rows(cfg) -> list[dict]:
    items, _ = ann.plan_work(cfg)
    return [{ann.WORK_COLUMN: np.array([json.dumps([it.to_row() for it in b])])} for b in ann.plan_batches(items, 1)]


def test_ray_stages_in_process_write_the_in_process_records(janus_folder, images, tmp_path, monkeypatch):
    """The Ray engine's caption and perception stages called in this process as their actors would be: the caption
    stage records each caption and passes the rows on with the captions in the records, the perception stage (whose
    config has no caption model: it never loads Janus) adds the maps, and the merged output is the in-process run's,
    whichever of the two part files was made first."""
    from test_annotate import tree

    reference = tmp_path / "reference"
    run(images, reference, janus_folder, domains=["depth"])
    out = tmp_path / "out"
    cfg = ann.AnnotateConfig(input=str(images), output=str(out), **FAST, caption_model=str(janus_folder),
                             caption_max_tokens=TOKENS, domains=["depth"], device="cpu").validate()
    stamp = 1
    perception = ray_engine._perception_stage(cfg, False, 1, 1.0, stamp)
    assert perception.kwargs["cfg_dict"]["caption_model"] is None
    real_load = annotator.load_caption_model
    monkeypatch.setattr(annotator, "load_caption_model", lambda *a: pytest.fail("the perception stage loaded Janus"))
    maps = ann.RayAnnotator(**perception.kwargs)  # made first: its part file is older than the caption stage's
    monkeypatch.setattr(annotator, "load_caption_model", real_load)
    [stage] = ray_engine._caption_stages(cfg, False, 1, 1.0, stamp)
    captioner = stage.fn(**stage.kwargs)
    totals = dict.fromkeys(ann.COUNT_COLUMNS, 0)
    for row in _stage_rows(cfg):
        passed = captioner(row)
        [item] = [ann.WorkItem.from_row(r) for r in json.loads(passed[ann.WORK_COLUMN][0])]
        assert not item.caption and NAME in item.record["caption"]  # captioned, and the caption travels on
        result = maps(passed)
        for c in totals:
            totals[c] += int(result[c][0])
    maps.annotator.close()
    assert totals == {"done": 3, "failed": 0, "captioned": 3, "captions_failed": 0}
    parts = sorted(p.name for p in (out / ann.STATE_DIR).glob("part-*.jsonl"))
    assert [p.split("-")[2] for p in parts] == ["ray1", "ray2"]  # one launch: captions sort before maps
    ann.merge_outputs(out)
    assert tree(out) == tree(reference)


def test_a_failed_caption_in_the_ray_caption_stage_goes_to_errors_and_the_maps_are_written(
        janus_folder, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = ann.AnnotateConfig(input=str(images), output=str(out), **FAST, caption_model=str(janus_folder),
                             caption_max_tokens=TOKENS, domains=["depth"], device="cpu").validate()
    _caption_fails_for_p1(monkeypatch)
    [stage] = ray_engine._caption_stages(cfg, False, 1, 1.0, 1)
    captioner = stage.fn(**stage.kwargs)
    maps = ann.RayAnnotator(**ray_engine._perception_stage(cfg, False, 1, 1.0, 1).kwargs)
    totals = dict.fromkeys(ann.COUNT_COLUMNS, 0)
    for row in _stage_rows(cfg):
        result = maps(captioner(row))
        for c in totals:
            totals[c] += int(result[c][0])
    maps.annotator.close()
    assert totals == {"done": 3, "failed": 0, "captioned": 2, "captions_failed": 1}
    ann.merge_outputs(out)
    recs = records(out)
    assert "caption" not in recs["image/p1.png"] and (out / recs["image/p1.png"]["annotation_depth"]).is_file()
    assert all(NAME in recs[f"image/p{i}.png"]["caption"] for i in (0, 2))
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["image"] == "image/p1.png" and errors[0]["caption_model"] == NAME
    assert "RuntimeError: boom" in errors[0]["error"]


@pytest.fixture(scope="module")
def ray_spy(tmp_path_factory):
    """A local Ray (2 CPUs) whose workers record their model loads, sampler calls and captions (tests/ray_spy.py);
    yields the spy file, emptied before each use by the test."""
    import os

    ray = pytest.importorskip("ray")
    repo = Path(__file__).resolve().parents[1]
    spy = tmp_path_factory.mktemp("spy") / "spy.jsonl"
    env = {"JODI_TEST_SPY": str(spy), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_spy.install", "env_vars": env})
    try:
        yield spy
    finally:
        ray.shutdown()


def _events(spy: Path) -> list[dict]:
    events = [json.loads(line) for line in spy.read_text().splitlines()] if spy.exists() else []
    spy.unlink(missing_ok=True)
    return events


def _pids(events, event: str) -> set:
    return {e["pid"] for e in events if e["event"] == event}


def test_ray_caption_and_perception_stages(janus_folder, images, tmp_path, ray_spy):
    """Under Ray Data the captions are a stage of their own: Janus is loaded once, in the caption actor, and never
    where the Jodi model is; the output equals the in-process run's (captions, maps, records); captions-only runs
    the caption stage alone (no Jodi); a run resumed under Ray does not caption again."""
    from test_annotate import tree

    reference = tmp_path / "reference"
    run(images, reference, janus_folder, domains=["depth"])
    caption = dict(caption_model=str(janus_folder), caption_max_tokens=TOKENS, domains=["depth"], device="cpu")

    def ray_run(out, **kw):
        cfg = ann.AnnotateConfig(input=str(images), output=str(out), **{**FAST, **caption, **kw})
        return ray_engine._annotate_ray(cfg, None, 1)

    _events(ray_spy)
    out = tmp_path / "ray"
    summary = ray_run(out)
    assert (summary.done, summary.failed, summary.captioned, summary.captions_failed) == (3, 0, 3, 0)
    events = _events(ray_spy)
    janus, jodi = _pids(events, "janus_load"), _pids(events, "jodi_load")
    assert len([e for e in events if e["event"] == "janus_load"]) == 1 and len(jodi) == 1 and not janus & jodi
    assert _pids(events, "caption") == janus and _pids(events, "sample") == jodi
    assert tree(out) == tree(reference)

    # Captions only: the caption stage alone, no Jodi; stopped after 2, then resumed with maps: 1 more caption.
    resumed = tmp_path / "resumed"
    first = ray_run(resumed, captions_only=True, stop_after=2)
    assert first.stopped and (first.done, first.captioned) == (2, 2)
    events = _events(ray_spy)
    assert not _pids(events, "jodi_load") and len([e for e in events if e["event"] == "caption"]) == 2
    second = ray_run(resumed)
    assert (second.done, second.captioned) == (3, 1)
    events = _events(ray_spy)
    assert len([e for e in events if e["event"] == "caption"]) == 1
    assert tree(resumed) == tree(reference)
    # Everything captioned: a run that makes more maps loads no Janus at all.
    third = ray_run(resumed, domains=["depth", "edge"])
    assert (third.done, third.captioned) == (3, 0)
    assert not _pids(_events(ray_spy), "janus_load")
    assert all("annotation_edge" in r and NAME in r["caption"] for r in records(resumed).values())


# ---------------------------------------------------------------------------------------------------------------------
# Where the models sit (one GPU): both stay, or they take turns
# ---------------------------------------------------------------------------------------------------------------------


class _Placed(torch.nn.Module):
    """A module that records where it is moved to instead of moving (there may be no GPU here)."""

    def __init__(self, name: str, n: int, moves: list):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.name, self.moves = name, moves

    def to(self, device):  # noqa: D102
        self.moves.append((self.name, str(device)))
        return self


def test_placement_rule(monkeypatch, caplog):
    import jodi_core.memory as memory

    caplog.set_level(logging.INFO, logger="jodi_core.jobs.annotate")
    moves: list = []
    dit, vae, janus = _Placed("dit", 10, moves), _Placed("vae", 10, moves), _Placed("janus", 1000, moves)  # 4000 B
    cuda = torch.device("cuda:0")

    monkeypatch.setattr(memory, "available_memory", lambda device: 4000 + 500)
    both = ann.ModelPlacement(cuda, [dit, vae], janus, margin=500)
    assert not both.turns and moves == [("janus", "cuda:0")] and "both stay on cuda:0" in caplog.text
    moves.clear()
    both.captions(), both.maps()
    assert moves == []  # nothing moves between phases

    monkeypatch.setattr(memory, "available_memory", lambda device: 4000 + 499)
    caplog.clear()
    turns = ann.ModelPlacement(cuda, [dit, vae], janus, margin=500)
    assert turns.turns and moves == [] and "take turns" in caplog.text
    turns.captions()
    assert moves == [("dit", "cpu"), ("vae", "cpu"), ("janus", "cuda:0")]
    moves.clear()
    turns.captions()
    assert moves == []  # already there
    turns.maps()
    assert moves == [("janus", "cpu"), ("dit", "cuda:0"), ("vae", "cuda:0")]

    moves.clear()
    caplog.clear()
    cpu = ann.ModelPlacement(torch.device("cpu"), [dit, vae], janus, margin=10**12)
    cpu.captions(), cpu.maps()
    assert not cpu.turns and moves == [("janus", "cpu")] and "on cpu" in caplog.text
    moves.clear()
    alone = ann.ModelPlacement(cuda, [], janus, margin=10**12)  # captions only: Janus on the device
    assert not alone.turns and moves == [("janus", "cuda:0")]


# ---------------------------------------------------------------------------------------------------------------------
# Training on the captions (the tiny Gemma-2 of the text-encoder tests as the caption encoder)
# ---------------------------------------------------------------------------------------------------------------------

MICRO_DCAE = dict(latent_channels=32, width_list=[8, 16, 32], encoder_depth_list=[1, 1, 1],
                  decoder_depth_list=[1, 1, 1], encoder_block_types=["ResBlock"] * 3,
                  decoder_block_types=["ResBlock"] * 3)
GEMMA_WIDTH, CAPTION_TOKENS = 48, 4  # the tiny Gemma's hidden size; caption tokens the micro DiT sees


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from host.tiny_models import load_hf_reference, write_tiny_gemma_folder

    folder = write_tiny_gemma_folder(tmp_path_factory.mktemp("gemma") / "gemma-2-2b-it-tiny")
    return load_hf_reference(folder)


@pytest.fixture(scope="module")
def captioned(janus_folder, tmp_path_factory) -> Path:
    """An annotated output with two captioners per record: "human" (from the input) and the tiny Janus."""
    root = tmp_path_factory.mktemp("joint")
    _make_images(root / "image")
    recs = [{"image": f"image/p{i}.png", "caption": {"human": f"human caption {i}"}} for i in range(3)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = root.parent / "captioned"
    run(root / "metadata.jsonl", out, janus_folder, domains=["depth"])
    return out


def _train_on(captioned, tmp_path, gemma, **kw) -> list[str]:
    """Train 4 DiT steps with every caption kept; returns the texts the tokenizer was given."""
    from jodi_core.jobs.train import DataConfig, TrainConfig, train

    tokenizer, encoder = gemma
    seen: list[str] = []

    def caption_encoder(captions):
        seen.extend(captions)
        tok = tokenizer(list(captions), max_length=CAPTION_TOKENS, padding="max_length", truncation=True,
                        return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(tok.input_ids, tok.attention_mask)[0]
        return hidden.float(), tok.attention_mask

    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"), data=DataConfig(kind="joint", root=str(captioned), size=32),
        batch_size=3, dcae=MICRO_DCAE, dcae_images_per_step=4, progress=False, device="cpu", dcae_steps=1,
        dit_steps=4, caption_dropout=0.0,
        transformer=dict(hidden_size=64, depth=2, num_heads=2, caption_channels=GEMMA_WIDTH,
                         model_max_length=CAPTION_TOKENS, base_size=8), **kw)
    result = train(cfg, caption_encoder=caption_encoder)
    assert all(np.isfinite(result.dit_losses)) and len(result.dit_losses) == 4
    return seen


def test_training_reads_the_captions_by_key(captioned, tmp_path, gemma, caplog):
    recs = records(captioned)
    janus_texts = {r["caption"][NAME] for r in recs.values()}
    human_texts = {r["caption"]["human"] for r in recs.values()}
    assert not janus_texts & human_texts  # told apart below

    seen = _train_on(captioned, tmp_path / "janus", gemma, caption_key=NAME)
    assert len(seen) == 12 and set(seen) == janus_texts  # 4 steps x 3 rows, each record's Janus caption
    seen = _train_on(captioned, tmp_path / "human", gemma, caption_key="human")
    assert set(seen) == human_texts
    # No key: a caption drawn per sample, seeded by (seed, epoch, index): both captioners over the epochs, and the
    # same draws when run again.
    seen = _train_on(captioned, tmp_path / "random", gemma)
    assert set(seen) <= janus_texts | human_texts and set(seen) & janus_texts and set(seen) & human_texts
    assert _train_on(captioned, tmp_path / "again", gemma) == seen
    # A key that no record has: one warning, then random captions.
    with caplog.at_level(logging.WARNING, logger="jodi_core.data.joint_dataset"):
        seen = _train_on(captioned, tmp_path / "missing", gemma, caption_key="BLIP")
    warnings = [r for r in caplog.records if "caption_key 'BLIP' is missing from 3 of 3 records" in r.getMessage()]
    assert len(warnings) == 1 and set(seen) <= janus_texts | human_texts


def test_caption_key_on_the_command_line_and_in_config_files(tmp_path):
    from jodi_core.jobs.train import TrainConfig, cli

    assert TrainConfig.from_dict({"caption_key": NAME}).caption_key == NAME
    assert TrainConfig().caption_key is None
    with pytest.raises(ValueError, match="caption_key"):
        TrainConfig.from_dict({"caption_key": ""})
    assert cli.build_parser().parse_args(["--caption-key", NAME]).caption_key == NAME


def test_a_caption_key_without_captions_in_training_is_named(tmp_path, caplog):
    """caption_dropout 1 (the command line's only choice) never shows a caption: a caption key is then a mistake."""
    from jodi_core.jobs.train.trainer import Trainer
    from test_train import _config

    with caplog.at_level(logging.WARNING, logger="jodi_core.jobs.train.trainer"):
        Trainer(_config(tmp_path, caption_key=NAME))
    assert f"caption_key '{NAME}' has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jodi_core.jobs.train.trainer"):
        Trainer(_config(tmp_path / "other"))
    assert "caption_key" not in caplog.text


def test_dataset_caption_choice():
    from jodi_core.data.joint_dataset import JointDataset

    ds = JointDataset.__new__(JointDataset)
    ds.caption_weights, ds.seed, ds.epoch, ds.caption_key = None, 0, 0, "b"
    caps = {"a": "text a", "b": "text b"}
    assert ds.choose_caption(caps, 0) == "text b" and ds.choose_caption("plain", 0) == "plain"
    assert ds.choose_caption({"a": "text a"}, 0) == "text a"  # key missing: what there is
    assert ds.choose_caption({}, 0) == "" and ds.choose_caption(None, 0) == ""
    ds.caption_key = None
    draws = {ds.choose_caption(caps, 0, epoch) for epoch in range(20)}
    assert draws == {"text a", "text b"}  # the epoch changes the draw
    assert [ds.choose_caption(caps, i, 3) for i in range(10)] == [ds.choose_caption(caps, i, 3) for i in range(10)]
