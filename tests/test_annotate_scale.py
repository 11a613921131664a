"""Scale-out: annotate under torchrun (2 CPU ranks, gloo) and Ray Data (local, 2 CPUs) gives the in-process maps;
DDP fine-tuning under torchrun keeps the ranks' weights identical while the loss falls."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jodi_core.jobs import annotate as ann
from jodi_core.jobs.annotate import annotator, ray_engine
from test_annotate import BATCH_TOLERANCE_LEVELS, FAST, make_inputs, pixels, tree

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _cli(src, out, batch: int) -> list[str]:
    return ["annotate", str(src), str(out), "--steps", "2", "--batch-size", str(batch), "--threads", "1",
            "--no-progress", "--device", "cpu"]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("in")
    make_inputs(src, corrupt=True)
    return src


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    ann.annotate(ann.AnnotateConfig(input=str(inputs), output=str(out), **FAST))
    return out


def _assert_same(reference: Path, out: Path) -> None:
    assert tree(out) == tree(reference)


def test_torchrun_two_ranks_gives_the_in_process_maps(inputs, reference, tmp_path):
    _run(TORCHRUN + ["-m", "jodi_core"] + _cli(inputs, tmp_path, 1))
    _assert_same(reference, tmp_path)  # bitwise: every image is a batch of one with its own path-derived seed
    errors = [json.loads(x)["image"] for x in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert errors == ["image/empty.jpg", "image/synth/broken.png"]


def test_torchrun_batched_kill_and_resume(inputs, reference, tmp_path):
    """Batches of 2 per rank (within the fp32 tolerance of batch size 1); a run stopped on both ranks is finished by
    a single-process run: the shards and the resume bookkeeping agree."""
    stopped = subprocess.run(TORCHRUN + ["-m", "jodi_core"] + _cli(inputs, tmp_path, 2) + ["--stop-after", "2"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert stopped.returncode != 0  # exit code 3: stopped early
    parts = list((tmp_path / ann.STATE_DIR).glob("part-*.jsonl"))
    assert len(parts) == 2 and all(len(p.read_text().splitlines()) == 2 for p in parts)
    summary = ann.annotate(ann.AnnotateConfig(input=str(inputs), output=str(tmp_path), **{**FAST, "batch_size": 2}))
    assert summary.skipped == 4 and summary.failed == 2
    a, b = tree(reference), tree(tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("annotation_") and not name.startswith("annotation_seg"):
            assert int(np.abs(pixels(reference / name) - pixels(tmp_path / name)).max()) <= BATCH_TOLERANCE_LEVELS
        elif not name.startswith("annotation_"):
            assert a[name] == b[name], name


def test_sigkill_mid_run_then_resume(inputs, reference, tmp_path):
    """A real kill (SIGKILL, no clean-up code runs) after 2 images; the next run finishes with the reference maps."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "jodi_core"] + _cli(inputs, tmp_path, 1), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list((tmp_path / ann.STATE_DIR).glob("part-*.jsonl"))
            if parts and len(parts[0].read_bytes().splitlines()) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "metadata.jsonl").exists()
    summary = ann.annotate(ann.AnnotateConfig(input=str(inputs), output=str(tmp_path), **FAST))
    n_images = len([p for p in inputs.rglob("*") if p.suffix in (".jpg", ".png")])
    assert summary.skipped >= 2 and summary.done + summary.skipped + summary.failed == n_images
    _assert_same(reference, tmp_path)


def test_ray_local_gives_the_in_process_maps(inputs, reference, tmp_path):
    pytest.importorskip("ray")
    _run([sys.executable, "-m", "jodi_core"] + _cli(inputs, tmp_path, 1) + ["--engine", "ray", "--ray-workers", "2"],
         timeout=300)
    _assert_same(reference, tmp_path)


def _two_buckets(folder: Path, square: int = 6, wide: int = 4) -> None:
    """``square`` 64 x 64 and ``wide`` 32 x 64 scenes, interleaved in name order (two aspect buckets)."""
    import torch
    from PIL import Image

    from jodi_core.jobs.demo import demo_scene

    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(32, 64) if i % 2 == 1 and i < 2 * wide else (64, 64) for i in range(square + wide)]
    assert shapes.count((32, 64)) == wide
    for i, (h, w) in enumerate(shapes):
        x = torch.nn.functional.interpolate(demo_scene(200 + i, 64)["image"], (h, w), mode="bilinear")[0]
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"b{i:02d}.png")


def test_plan_batches_one_bucket_and_one_set_of_maps_per_batch(tmp_path):
    """The driver's plan: each batch holds images of one aspect bucket and one set of maps to make, in key order, cut
    at the batch size; images that will fail are batched apart and never mixed into a sampled batch."""
    src = tmp_path / "in"
    _two_buckets(src)
    (src / "b99_broken.png").write_bytes(b"not a png")
    cfg = ann.AnnotateConfig(input=str(src), output=str(tmp_path / "out"), **{**FAST, "batch_size": 4})
    items, _ = ann.plan_work(cfg)
    items[0].domains = ("depth",)  # b00 needs other maps than the rest of its bucket
    batches = [[it.key[len("image/"):-len(".png")] for it in b] for b in ann.plan_batches(items, 4)]
    assert batches == [["b00"], ["b01", "b03", "b05", "b07"], ["b02", "b04", "b06", "b08"], ["b09"], ["b99_broken"]]
    assert sorted(it.key for b in ann.plan_batches(items, 4) for it in b) == sorted(it.key for it in items)


def test_ray_worker_samples_full_batches_keeps_one_writer_pool_and_records_each_call(tmp_path, monkeypatch):
    """The perception stage's callable class, called in this process as a Ray actor would call it, one work row
    (one planned batch) per call: every call samples one full batch, every record of a call is in the part file
    when the call returns (a killed actor loses at most the batch in flight), and the writer pool is made once."""
    pools = []

    class CountingPool(annotator.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs.get("thread_name_prefix"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(annotator, "ThreadPoolExecutor", CountingPool)
    src, out = tmp_path / "in", tmp_path / "out"
    _two_buckets(src)
    cfg = ann.AnnotateConfig(input=str(src), output=str(out), **{**FAST, "batch_size": 4, "device": "cpu"})
    items, _ = ann.plan_work(cfg)
    rows = [{ann.WORK_COLUMN: np.array([json.dumps([it.to_row() for it in b])])} for b in ann.plan_batches(items, 4)]
    pools.clear()  # planning reads the headers on a pool of its own
    worker = ann.RayAnnotator(**ray_engine._perception_stage(cfg, False, 1, 1.0).kwargs)
    sampled = []
    pipe_class = type(worker.annotator.pipe)
    pipe_call = pipe_class.__call__

    def spy(self, *args, **kwargs):
        sampled.append(len(kwargs["seeds"]))
        return pipe_call(self, *args, **kwargs)

    monkeypatch.setattr(pipe_class, "__call__", spy)
    recorded = []
    for row in rows:
        result = worker(row)
        assert int(result["done"][0]) == len(json.loads(row[ann.WORK_COLUMN][0]))
        part = next((out / ann.STATE_DIR).glob("part-*.jsonl"))
        recorded.append(len(part.read_text().splitlines()))
    assert sampled == [4, 2, 4]  # the squares (4 + 2), then the wide ones
    assert recorded == [4, 6, 10]
    assert pools == ["jodi-annotate-write"]
    worker.annotator.close()


def test_ray_worker_two_calls_at_once_take_the_model_in_turn(tmp_path, monkeypatch):
    """Two calls at once on one worker, as a Ray actor with two concurrent calls runs them (one samples while the
    other waits for its files): the model takes one batch at a time, and each call returns with its records
    written."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    src, out = tmp_path / "in", tmp_path / "out"
    _two_buckets(src)
    cfg = ann.AnnotateConfig(input=str(src), output=str(out), **{**FAST, "batch_size": 4, "device": "cpu"})
    items, _ = ann.plan_work(cfg)
    rows = [{ann.WORK_COLUMN: np.array([json.dumps([it.to_row() for it in b])])} for b in ann.plan_batches(items, 4)]
    stage = ray_engine._perception_stage(cfg, False, 1, 1.0)
    assert stage.concurrent_calls == 2
    worker = ann.RayAnnotator(**stage.kwargs)
    pipe_class = type(worker.annotator.pipe)
    pipe_call = pipe_class.__call__
    lock, active, most = threading.Lock(), [0], [0]

    def spy(self, *args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return pipe_call(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(pipe_class, "__call__", spy)

    def call(row):
        result = worker(row)
        keys = {r["key"] for r in json.loads(row[ann.WORK_COLUMN][0])}
        recorded = {json.loads(line)["image"] for p in (out / ann.STATE_DIR).glob("part-*.jsonl")
                    for line in p.read_text().splitlines()}
        assert keys <= recorded  # this call's records are written when it returns
        return int(result["done"][0])

    with ThreadPoolExecutor(2) as pool:
        assert sum(pool.map(call, rows)) == 10
    assert most[0] == 1
    worker.annotator.close()


def test_ray_full_sampler_batches_and_one_writer_pool_per_worker(tmp_path):
    """10 images in 2 aspect buckets (6 + 4, interleaved by name), batch size 4, 2 Ray workers: every sampler call is
    a full batch of one bucket (4 + 2 and 4: 3 calls, not a call per bucket per Ray batch), each worker makes its
    writer pool once however many batches it gets, and the maps equal the in-process run's bitwise (the same
    batches). A worker set-up hook (tests/ray_spy.py) records the calls inside the Ray workers."""
    ray = pytest.importorskip("ray")
    src = tmp_path / "in"
    _two_buckets(src)
    cfg = dict(steps=2, batch_size=4, threads=1, progress=False, device="cpu")
    ann.annotate(ann.AnnotateConfig(input=str(src), output=str(tmp_path / "ref"), **cfg))
    spy = tmp_path / "spy.jsonl"
    env = {"JODI_TEST_SPY": str(spy), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_spy.install", "env_vars": env})
    try:
        summary = ray_engine._annotate_ray(ann.AnnotateConfig(input=str(src), output=str(tmp_path / "out"), **cfg), None, 2)
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (10, 0)
    events = [json.loads(line) for line in spy.read_text().splitlines()]
    assert sorted(e["batch"] for e in events if e["event"] == "sample") == [2, 4, 4]
    pools = collections.Counter(e["pid"] for e in events if e["event"] == "writer_pool")
    assert pools and set(pools.values()) == {1}, pools
    _assert_same(tmp_path / "ref", tmp_path / "out")


def test_ray_is_not_imported_by_jodi_core_or_annotate():
    code = "import sys, jodi_core, jodi_core.jobs.annotate, jodi_core.pipeline; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from jodi_core.jobs.train import DataConfig, TrainConfig, Trainer

    out = sys.argv[1]
    torch.set_num_threads(1)
    cfg = TrainConfig(
        output_dir=out, data=DataConfig(size=32, fixed_batch=True), batch_size=2, device="cpu", progress=False,
        dcae=dict(latent_channels=32, width_list=[8, 16, 32], encoder_depth_list=[1, 1, 1],
                  decoder_depth_list=[1, 1, 1], encoder_block_types=["ResBlock"] * 3,
                  decoder_block_types=["ResBlock"] * 3),
        transformer=dict(hidden_size=64, depth=2, num_heads=2, caption_channels=16, model_max_length=4, base_size=8),
        dcae_images_per_step=8, dcae_lr=2e-3, dit_lr=1e-3, fixed_noise=True, dcae_steps=6, dit_steps=8,
        save_every=100, resume=False,
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    rank = trainer.dist.rank
    torch.save({"transformer": trainer.transformer.state_dict(), "dcae": trainer.dcae.state_dict()},
               os.path.join(out, f"weights-rank{rank}.pt"))
    with open(os.path.join(out, f"losses-rank{rank}.json"), "w") as f:
        json.dump({"dcae": result.dcae_losses, "dit": result.dit_losses, "world": trainer.dist.world_size}, f)
    trainer.dist.teardown()
    """
)


def test_ddp_finetuning_two_cpu_ranks(tmp_path):
    import torch

    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    _run(TORCHRUN + [str(script), str(tmp_path)], timeout=300)
    losses = [json.loads((tmp_path / f"losses-rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0]["world"] == losses[1]["world"] == 2
    assert losses[0]["dit"] == losses[1]["dit"]  # logged losses are averaged over the ranks
    for stage in ("dcae", "dit"):
        curve = losses[0][stage]
        assert np.mean(curve[-3:]) < 0.8 * curve[0], (stage, curve)
    w = [torch.load(tmp_path / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for part in ("transformer", "dcae"):
        assert w[0][part].keys() == w[1][part].keys()
        for k in w[0][part]:
            assert torch.equal(w[0][part][k], w[1][part][k]), (part, k)
    assert (tmp_path / "jodi.safetensors").is_file()  # rank 0 wrote the outputs
