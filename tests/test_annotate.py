"""``python -m jodi_core annotate``: Joint-1.6M layout, per-path seeds, batching, resume, errors, training on it.

The demo model on CPU at its 64 px buckets with 2 sampling steps; inputs are the shared example images (shrunk to
128 px so that writing maps at each image's own size stays cheap) and a few synthetic scenes of other aspect ratios.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLE_DATA_DIR
from jodi_core.jobs import annotate as ann
from jodi_core.jobs.annotate import annotator
from jodi_core.domains import DOMAINS, LABEL_NAMES, seg_palette

FAST = dict(steps=2, batch_size=1, threads=1, progress=False)
# Batching changes fp32 summation order inside the model; after 8-bit quantisation the maps then differ by at most
# this many levels (measured: 1) at a few pixels.
BATCH_TOLERANCE_LEVELS = 2


def make_inputs(folder: Path, corrupt: bool = False) -> list[str]:
    """Example images shrunk to <= 128 px and three synthetic scenes (square, wide, tall PNGs in a sub-folder)."""
    from jodi_core.jobs.demo import demo_scene

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    if (EXAMPLE_DATA_DIR / "image").is_dir():
        for path in sorted((EXAMPLE_DATA_DIR / "image").glob("*.jpg")):
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))
                im.save(folder / path.name, quality=95)
            names.append(path.name)
    (folder / "synth").mkdir(exist_ok=True)
    for i, (h, w) in enumerate([(64, 64), (56, 100), (90, 60)]):
        x = torch.nn.functional.interpolate(demo_scene(100 + i, 64)["image"], (h, w), mode="bilinear")[0]
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / "synth" / f"s{i}.png")
        names.append(f"synth/s{i}.png")
    if corrupt:
        (folder / "empty.jpg").write_bytes(b"")
        good = (folder / "synth" / "s0.png").read_bytes()
        (folder / "synth" / "broken.png").write_bytes(good[: len(good) // 2])
        (folder / "notes.txt").write_text("not an image")
    return names


def run(src, out, **kw) -> ann.AnnotateSummary:
    return ann.annotate(ann.AnnotateConfig(input=str(src), output=str(out), **{**FAST, **kw}))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("in")
    make_inputs(src)
    return src


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """One uninterrupted run with batch size 1: the reference the other runs are compared with."""
    out = tmp_path_factory.mktemp("ref")
    summary = run(inputs, out)
    assert summary.done == len(list(inputs.rglob("*.*"))) and summary.failed == 0 and not summary.stopped
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_per_sample_seeds():
    from jodi_core.jobs.demo import tiny_random_models
    from jodi_core.pipeline import JodiPipeline

    pipe = JodiPipeline(*tiny_random_models())
    roles = [1, 0, 0, 2, 2, 2, 2, 2]
    cond = {"image": torch.rand(2, 3, 64, 64)}
    kw = dict(steps=2, decode=False, snap_to_bucket=False)
    both = pipe(roles, 64, 64, conditions=cond, seeds=[7, 123], **kw).latents
    one = pipe(roles, 64, 64, conditions={"image": cond["image"][1:]}, seeds=[123], **kw).latents
    assert both.shape[0] == 2
    torch.testing.assert_close(both[1], one[0], rtol=0, atol=1e-5)  # row 1 does not depend on row 0
    # The old seed/batch_size path is the special case seeds = seed, seed + 1, ...
    old = pipe(roles, 64, 64, conditions=cond, seed=7, batch_size=2, **kw).latents
    assert torch.equal(old, pipe(roles, 64, 64, conditions=cond, seeds=[7, 8], **kw).latents)
    assert not torch.equal(both[0], both[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        pipe(roles, 64, 64, conditions=cond, seeds=[1, 2], batch_size=3, **kw)
    with pytest.raises(ValueError, match="one seed per sample"):
        pipe(roles, 64, 64, conditions=cond, seeds=[], **kw)


def test_names_and_seeds():
    assert ann.label_path("image/a/b.jpg", "depth") == "annotation_depth/a/b.jpg"
    assert ann.label_path("image/a/b.jpg", "seg") == "annotation_seg_12colors/a/b.jpg.png"
    assert ann.label_path("image/c.png", "normal") == "annotation_normal/c.png.jpg"
    assert ann.label_path("image/c.webp", "segmentation") == "annotation_seg_12colors/c.webp.png"
    s = ann.image_seed("image/a.jpg")
    assert s == ann.image_seed("image/a.jpg") and 0 <= s < 2**63
    assert len({ann.image_seed(f"image/{i}.jpg") for i in range(100)}) == 100
    assert ann.image_seed("image/a.jpg", seed=1) != s
    assert ann.shard(list(range(7)), 0, 2) + ann.shard(list(range(7)), 1, 2) == [0, 2, 4, 6, 1, 3, 5]


def test_shards_do_not_depend_on_progress(inputs, tmp_path):
    """A rank that plans late (after another rank finished images) still owns exactly its own shard."""
    cfg = ann.AnnotateConfig(input=str(inputs), output=str(tmp_path), **FAST)
    before = [[it.key for it in ann.plan_work(cfg, r, 2)[0]] for r in (0, 1)]
    assert not set(before[0]) & set(before[1])
    assert sorted(before[0] + before[1]) == sorted(it.key for it in ann.plan_work(cfg)[0])
    ann.annotate(cfg, rank=0, world=2)  # rank 0 finishes its shard (and merges nothing of rank 1)
    assert [it.key for it in ann.plan_work(cfg, 1, 2)[0]] == before[1]
    assert ann.plan_work(cfg, 0, 2) == ([], len(before[0]))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Unknown domain"):
        ann.AnnotateConfig("a", "b", domains=["height"]).validate()
    with pytest.raises(ValueError, match="labels"):
        ann.AnnotateConfig("a", "b", domains=["image"]).validate()
    with pytest.raises(ValueError, match="steps"):
        ann.AnnotateConfig("a", "b", steps=0).validate()
    with pytest.raises(ValueError, match="fit must be one of crop, stretch"):
        ann.AnnotateConfig("a", "b", fit="pad").validate()
    with pytest.raises(ValueError, match="both --dit and --vae"):
        ann.AnnotateConfig("a", "b", dit="x.safetensors").validate()
    with pytest.raises(FileNotFoundError, match="Input not found"):
        run(tmp_path / "missing", tmp_path / "out")
    assert ann.main_annotate([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert ann.main_annotate([str(tmp_path), str(tmp_path / "o"), "--domains", "depth,height"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Output layout
# ---------------------------------------------------------------------------------------------------------------------


def test_output_is_the_joint_layout(inputs, reference):
    records = [json.loads(line) for line in (reference / "metadata.jsonl").read_text().splitlines()]
    keys = [r["image"] for r in records]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == len(list(inputs.rglob("*.*")))
    palette = {tuple(int(v) for v in c) for c in seg_palette("colors12").tolist()}
    for rec in records:
        rel = rec["image"][len("image/"):]
        src = inputs / rel
        assert (reference / rec["image"]).read_bytes() == src.read_bytes()  # the image itself, untouched
        with Image.open(src) as im:
            w, h = im.size
        assert rec["info"] == {"height": h, "width": w}
        assert rec[ann.FINGERPRINT_KEY] == ann.fingerprint(src)  # what resuming compares the source with
        for d in DOMAINS[1:]:
            path = reference / rec[d.metadata_key]
            assert rec[d.metadata_key] == ann.label_path(rec["image"], d.name)
            with Image.open(path) as im:
                assert im.size == (w, h), (path, im.size)  # maps at the image's own size
                if d.name == "segmentation":
                    assert im.format == "PNG" and im.mode == "RGB"
                    colours = {tuple(c) for c in np.asarray(im).reshape(-1, 3).tolist()}
                    assert colours <= palette  # lossless and snapped to the 12-colour palette
                else:
                    assert im.format == "JPEG" and im.mode == ("L" if d.name == "depth" else "RGB")
    # The example data's own naming: <name>.jpg for labels, <name>.jpg.png for the segmentation.
    if (EXAMPLE_DATA_DIR / "metadata.jsonl").is_file():
        example = json.loads((EXAMPLE_DATA_DIR / "metadata.jsonl").read_text().splitlines()[0])
        ours = next(r for r in records if r["image"] == example["image"])
        for d in DOMAINS[1:]:
            if d.metadata_key in example:
                assert ours[d.metadata_key] == example[d.metadata_key]
    assert not (reference / "errors.jsonl").exists()
    assert not list((reference / ann.STATE_DIR).glob("*.jsonl"))  # parts merged away
    assert not [p for p in reference.rglob("*.tmp")]


def test_written_maps_are_the_pipelines_perception(inputs, reference):
    """What annotate writes for an image is Jodi's perception of it: the same maps a direct pipeline run gives
    (same bucket, fit, seed and steps), within the 8-bit/JPEG rounding, each from its own domain."""
    from jodi_core import imaging
    from jodi_core.jobs.demo import load_demo_models
    from jodi_core.pipeline import JodiPipeline

    key = "image/synth/s1.png"  # 56 x 100: not a bucket's aspect ratio, so the fit matters too
    image = ann.read_image(inputs / "synth" / "s1.png")
    pipe = JodiPipeline(*load_demo_models()[:2])
    H, W = image.shape[-2:]
    work_h, work_w = imaging.snap_to_bucket(H, W, pipe.base_size, pipe.compression)
    cond = imaging.fit_condition(image[None], work_h, work_w, "stretch")
    with torch.no_grad():
        result = pipe([1] + [0] * 7, work_h, work_w, conditions={"image": cond}, steps=FAST["steps"], cfg_scale=1.0,
                      seeds=[ann.image_seed(key, 0)], snap_to_bucket=False, decode=False)
        maps, _ = pipe.decode_latents(result.latents, result.roles, H, W)
    for name in ("depth", "normal", "edge"):
        written = pixels(reference / ann.label_path(key, name)).astype(np.float32)
        expected = (maps[name][0].permute(1, 2, 0).numpy() * 255).round()
        if written.ndim == 2:  # grey JPEG
            expected = expected[..., 0]
        assert np.abs(written - expected).mean() < 3, name  # JPEG (quality 95) rounding only
    depth = pixels(reference / ann.label_path(key, "depth"))
    normal = pixels(reference / ann.label_path(key, "normal"))
    assert np.abs(depth[..., None] - normal).mean() > 10  # each map comes from its own domain


def test_maps_do_not_depend_on_batch_size(inputs, reference, tmp_path):
    run(inputs, tmp_path, batch_size=3)
    a, b = tree(reference), tree(tmp_path)
    assert a.keys() == b.keys()
    assert a["metadata.jsonl"] == b["metadata.jsonl"]
    worst = 0
    for name in a:
        if name.startswith("annotation_seg_12colors/"):
            # Snapped to a palette: a tiny difference may flip a class-boundary pixel, but only a few.
            diff = np.any(pixels(reference / name) != pixels(tmp_path / name), axis=-1)
            assert diff.mean() < 0.01, name
        elif name.startswith("annotation_"):
            worst = max(worst, int(np.abs(pixels(reference / name) - pixels(tmp_path / name)).max()))
        else:
            assert a[name] == b[name], name
    assert worst <= BATCH_TOLERANCE_LEVELS, worst


def test_domain_subset_then_more_domains(inputs, tmp_path):
    run(inputs, tmp_path, domains=["depth", "seg"])
    recs = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert all(set(r) == {"image", "info", "annotation_depth", "annotation_seg_12colors", ann.FINGERPRINT_KEY}
               for r in recs)
    assert not (tmp_path / "annotation_normal").exists()
    depth_before = (tmp_path / recs[0]["annotation_depth"]).read_bytes()
    summary = run(inputs, tmp_path, domains=["depth", "normal"])  # only the missing normals are made
    assert summary.done == len(recs) and summary.skipped == 0
    recs2 = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert all("annotation_normal" in r and "annotation_seg_12colors" in r for r in recs2)
    assert (tmp_path / recs[0]["annotation_depth"]).read_bytes() == depth_before
    assert run(inputs, tmp_path, domains=["depth", "normal"]).skipped == len(recs)


# ---------------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing twice
# ---------------------------------------------------------------------------------------------------------------------


def test_newer_part_records_win_and_older_maps_are_kept(tmp_path):
    state = tmp_path / ann.STATE_DIR
    state.mkdir()
    older, newer = ann.part_name("rank0"), ann.part_name("rank0")
    assert older < newer  # launch time first: name order is age order, whatever the random suffix
    # The random suffixes sort the other way round here, which must not matter.
    older, newer = older[:-6] + "ffffff", newer[:-6] + "000000"
    (state / f"part-{older}.jsonl").write_text(json.dumps(
        {"image": "image/a.png", "info": {"height": 1}, "annotation_depth": "annotation_depth/a.png"}) + "\n")
    (state / f"part-{newer}.jsonl").write_text(json.dumps(
        {"image": "image/a.png", "info": {"height": 2}, "annotation_normal": "annotation_normal/a.png"}) + "\n")
    record = ann.known_records(tmp_path)["image/a.png"]
    assert record == {"image": "image/a.png", "info": {"height": 2}, "annotation_depth": "annotation_depth/a.png",
                      "annotation_normal": "annotation_normal/a.png"}


def test_rank_zero_does_not_merge_while_another_rank_stopped(inputs, tmp_path):
    cfg = ann.AnnotateConfig(input=str(inputs), output=str(tmp_path), **FAST)
    seen = []

    def other_rank_stopped(stopped: bool) -> bool:
        seen.append(stopped)
        return True

    summary = ann.annotate(cfg, rank=0, world=2, any_stopped=other_rank_stopped)
    assert seen == [False] and summary.stopped  # rank 0 finished its own shard ...
    assert not (tmp_path / "metadata.jsonl").exists()  # ... but leaves the merge to the next complete run
    assert list((tmp_path / ann.STATE_DIR).glob("part-*.jsonl"))


def test_kill_and_resume_matches_an_uninterrupted_run(inputs, reference, tmp_path):
    n = len(list(inputs.rglob("*.*")))
    first = run(inputs, tmp_path, stop_after=2)
    assert first.stopped and first.done == 2
    assert not (tmp_path / "metadata.jsonl").exists()  # a stopped run does not merge, as a killed one could not
    parts = list((tmp_path / ann.STATE_DIR).glob("part-*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in parts) == 2
    # What a kill can leave behind: a torn last record line, a temporary file, maps of an image without its record.
    with open(parts[0], "a") as f:
        f.write('{"image": "image/synth/s2.png", "annotation_dep')
    (tmp_path / "annotation_depth" / ".x.jpg.1234.tmp").write_bytes(b"partial")
    done_keys = {json.loads(x)["image"] for x in parts[0].read_text().splitlines()[:2]}
    orphan = sorted(set(json.loads(x)["image"] for x in (reference / "metadata.jsonl").read_text().splitlines())
                    - done_keys)[0]
    orphan_map = tmp_path / ann.label_path(orphan, "edge")
    orphan_map.parent.mkdir(parents=True, exist_ok=True)
    orphan_map.write_bytes(b"half-written map from the killed run")

    second = run(inputs, tmp_path)
    assert (second.done, second.skipped, second.failed, second.stopped) == (n - 2, 2, 0, False)
    (tmp_path / "annotation_depth" / ".x.jpg.1234.tmp").unlink()  # stray temp files are harmless, never listed
    assert tree(tmp_path) == tree(reference)  # bitwise: same seeds, same batches of one
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["image"] for x in lines}) == n

    third = run(inputs, tmp_path)
    assert (third.done, third.skipped) == (0, n) and tree(tmp_path) == tree(reference)


def test_bad_images_go_to_errors_and_the_rest_is_done(tmp_path):
    src = tmp_path / "in"
    good = make_inputs(src, corrupt=True)
    out = tmp_path / "out"
    summary = run(src, out, batch_size=2)
    assert (summary.done, summary.failed) == (len(good), 2)
    errors = {json.loads(x)["image"]: json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()}
    assert set(errors) == {"image/empty.jpg", "image/synth/broken.png"}
    assert "0 bytes" in errors["image/empty.jpg"]["error"]
    assert "cannot read image" in errors["image/synth/broken.png"]["error"]
    keys = {json.loads(x)["image"] for x in (out / "metadata.jsonl").read_text().splitlines()}
    assert keys == {f"image/{n}" for n in good}
    assert not (out / "image" / "empty.jpg").exists()
    # Fixed on disk: the next run picks it up and it leaves errors.jsonl.
    shutil.copyfile(src / "synth" / "s0.png", src / "synth" / "broken.png")
    again = run(src, out)
    assert (again.done, again.failed, again.skipped) == (1, 1, len(good))
    errors = [json.loads(x)["image"] for x in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == ["image/empty.jpg"]


def test_a_failed_write_stops_the_run_and_records_nothing_for_that_image(inputs, reference, tmp_path, monkeypatch):
    real = annotator._encode_image
    calls = []

    def failing(x, fmt, gray, quality):
        calls.append(fmt)
        if fmt == "PNG" and calls.count("PNG") == 3:  # the third image's segmentation
            raise OSError("No space left on device")
        return real(x, fmt, gray, quality)

    monkeypatch.setattr(annotator, "_encode_image", failing)
    with pytest.raises(OSError, match="No space left"):
        run(inputs, tmp_path)  # written on the background thread, raised in the caller
    # Writes already queued behind the failed one may finish (each is complete on its own); the failed image has
    # no record, so the next run redoes it.
    recorded = {json.loads(x)["image"] for p in (tmp_path / ann.STATE_DIR).glob("part-*.jsonl")
                for x in p.read_text().splitlines()}
    third = sorted(json.loads(x)["image"] for x in (reference / "metadata.jsonl").read_text().splitlines())[2]
    assert 2 <= len(recorded) and third not in recorded
    monkeypatch.setattr(annotator, "_encode_image", real)
    assert run(inputs, tmp_path).skipped == len(recorded)
    assert tree(tmp_path) == tree(reference)


# ---------------------------------------------------------------------------------------------------------------------
# metadata.jsonl input: fill in missing maps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_joint(tmp_path) -> Path:
    """The example dataset shrunk to 96 px, with some labels removed from the metadata."""
    if not (EXAMPLE_DATA_DIR / "metadata.jsonl").is_file():
        pytest.skip(f"example dataset not found at {EXAMPLE_DATA_DIR}")
    root = tmp_path / "joint"
    for path in EXAMPLE_DATA_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".jpg", ".png"):
            dst = root / path.relative_to(EXAMPLE_DATA_DIR)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as im:
                fmt = im.format
                im.thumbnail((96, 96), Image.NEAREST if fmt == "PNG" else Image.BICUBIC)
                im.save(dst, fmt)
    recs = [json.loads(x) for x in (EXAMPLE_DATA_DIR / "metadata.jsonl").read_text().splitlines()]
    recs[0].pop("annotation_normal")
    recs[2].pop("annotation_depth")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_fill_in_missing_maps_in_place(small_joint):
    before = tree(small_joint)
    recs = [json.loads(x) for x in (small_joint / "metadata.jsonl").read_text().splitlines()]
    summary = run(small_joint / "metadata.jsonl", small_joint, domains=["depth", "normal", "openpose"])
    # record 0 lacks normal; record 1 is complete; record 2 lacks depth; the example has openpose only for one.
    assert summary.done == 3 - sum(all(d in r for d in ("annotation_depth", "annotation_normal",
                                                         "annotation_openpose")) for r in recs)
    after = [json.loads(x) for x in (small_joint / "metadata.jsonl").read_text().splitlines()]
    assert [r["image"] for r in after] == [r["image"] for r in recs]  # the input's order is kept
    for old, new in zip(recs, after):
        assert new["caption"] == old["caption"]
        for key, value in old.items():
            if key.startswith("annotation_"):
                assert new[key] == value and (small_joint / value).read_bytes() == before[value]
        assert all(new.get(k) for k in ("annotation_depth", "annotation_normal", "annotation_openpose"))
    assert run(small_joint / "metadata.jsonl", small_joint, domains=["depth", "normal", "openpose"]).done == 0


def test_fill_in_into_another_folder_copies_what_exists(small_joint, tmp_path):
    out = tmp_path / "filled"
    run(small_joint / "metadata.jsonl", out, domains=["normal"])
    recs = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for rec in recs:
        for key, rel in rec.items():
            if key == "image" or key.startswith("annotation_"):
                assert (out / rel).is_file(), rel
    # Existing maps are copied byte for byte; the training reader opens the result.
    rec0 = recs[1]
    assert (out / rec0["annotation_depth"]).read_bytes() == (small_joint / rec0["annotation_depth"]).read_bytes()
    from jodi_core.data.joint_dataset import JointDataset

    item = JointDataset(out, 32)[0]
    assert bool(item["available"][[0, 4]].all())


# ---------------------------------------------------------------------------------------------------------------------
# The training loop reads the output as it is
# ---------------------------------------------------------------------------------------------------------------------


def test_training_loop_trains_on_the_output(reference, tmp_path):
    from jodi_core.jobs.train import DataConfig, TrainConfig, train

    micro_dcae = dict(latent_channels=32, width_list=[8, 16, 32], encoder_depth_list=[1, 1, 1],
                      decoder_depth_list=[1, 1, 1], encoder_block_types=["ResBlock"] * 3,
                      decoder_block_types=["ResBlock"] * 3)
    micro_dit = dict(hidden_size=64, depth=2, num_heads=2, caption_channels=16, model_max_length=4, base_size=8)
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(kind="joint", root=str(reference), size=32, fixed_batch=True),
        batch_size=3, dcae=micro_dcae, transformer=micro_dit, dcae_images_per_step=8, dcae_lr=2e-3, dit_lr=1e-3,
        progress=False, device="cpu", fixed_noise=True, dcae_steps=8, dit_steps=8,
    )
    result = train(cfg)
    assert np.mean(result.dcae_losses[-3:]) < 0.8 * result.dcae_losses[0], result.dcae_losses
    assert np.mean(result.dit_losses[-3:]) < 0.8 * result.dit_losses[0], result.dit_losses


def test_command_line_and_summary(inputs, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="jodi_core.jobs.annotate")
    argv = [str(inputs), str(tmp_path), "--steps", "2", "--batch-size", "2", "--threads", "1", "--no-progress",
            "--domains", "edge,seg"]
    assert ann.main_annotate(argv + ["--stop-after", "1"]) == 3  # stopped early: not complete
    assert ann.main_annotate(argv) == 0
    assert "done" in caplog.text and "skipped" in caplog.text and "failed" in caplog.text
    recs = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(recs) == len(list(inputs.rglob("*.*")))
    assert all(set(r) == {"image", "info", "annotation_edge", "annotation_seg_12colors", ann.FINGERPRINT_KEY}
               for r in recs)
    assert set(LABEL_NAMES) >= {"edge", "segmentation"}
