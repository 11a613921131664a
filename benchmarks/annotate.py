"""Throughput of ``python -m jodi_core annotate`` (images/s). Not a test: ratios between engines, not pass/fail.

CPU (default): the embedded demo model on synthetic scenes (64 px buckets, three aspect ratios in turn), as one
process, as 2 torchrun ranks (gloo, one thread each) and as Ray Data with 2 local workers (one thread each), for each
image count of ``--images`` (default 24 and 96). Each engine runs as its own command on a fresh output folder, the
engines one after the other in one run (``--repeat N``: N rounds in turn, medians reported); reported are the wall
time of the whole command (Python start, model load, Ray start and stop included) and the rate in the run's own
summary line (from the start of the annotate call: Ray start included, Python start not), each as images/s and as a
ratio to the single process of the same run.

CPU with ``--captions``: every engine also captions every image with Janus (``--caption-model JANUS_FOLDER``, default
a tiny random Janus written by tests/janus_tiny.py, ``--caption-max-tokens`` tokens each): in one process and each
torchrun rank both models take turns per window; under Ray the captions are a stage of their own
(``--ray-caption-workers`` Janus actors, default as many as the perception workers) before the perception stage.

GPU (``--gpu``): the real 1.6B Jodi config (random bf16 weights) with the DC-AE f32c32, 512 px images, batch 8,
all 7 labels, in-process on one device after a warm-up batch. Target on one H100: >= 4.5 images/s (the analytic
floor, DiT steps plus decodes at the card's bf16 rate, is 6.1 images/s).

    python benchmarks/annotate.py [--images 24 96] [--steps 4] [--batch-size 4] [--repeat 1]
    python benchmarks/annotate.py --captions [--caption-model JANUS_FOLDER] [--ray-caption-workers N] [--images 96]
    python benchmarks/annotate.py --gpu [--images 64] [--steps 20] [--batch-size 8]
    python benchmarks/annotate.py --gpu --tiny --size 64 --images 8 --steps 2     (CPU smoke run of the GPU path)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_RATE = re.compile(r"(\d+) done, (\d+) skipped, (\d+) failed in ([\d.]+) s \(([\d.]+) images/s\)")
_CAPTIONED = re.compile(r"(\d+) captioned, (\d+) captions failed")


def make_scenes(folder: Path, n: int, size: int = 64) -> None:
    """``n`` synthetic scenes, every third one wide or tall so that several aspect buckets occur."""
    import torch
    from PIL import Image

    from jodi_core.jobs.demo import demo_scene

    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(size, size), (size * 3 // 4, size * 4 // 3), (size * 4 // 3, size * 3 // 4)]
    for i in range(n):
        h, w = shapes[i % 3]
        x = torch.nn.functional.interpolate(demo_scene(1000 + i, size)["image"], (h, w), mode="bilinear")[0]
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"s{i:04d}.png")


def _timed(cmd: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = _RATE.findall(proc.stdout + proc.stderr)
    done, _, failed, seconds, rate = m[-1]
    captioned = _CAPTIONED.findall(proc.stdout + proc.stderr)
    return {"wall_s": wall, "done": int(done), "run_s": float(seconds), "run_images_per_s": float(rate),
            "wall_images_per_s": int(done) / wall, "captioned": int(captioned[-1][0]) if captioned else 0}


ENGINES = {
    "1 process": [sys.executable, "-m", "jodi_core"],
    "torchrun x2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "jodi_core"],
    "ray x2": [sys.executable, "-m", "jodi_core"],
}


def _caption_args(args, tmp: str) -> list[str]:
    """The annotate options that add captions (``--captions``); a tiny random Janus when no model is given."""
    if not args.captions:
        return []
    model = args.caption_model
    if model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from janus_tiny import write_tiny_janus

        model = str(write_tiny_janus(Path(tmp) / "Janus-Tiny", layout="original", seed=0))
    return ["--caption-model", str(model), "--caption-max-tokens", str(args.caption_max_tokens)]


def bench_cpu(args) -> dict:
    results: dict = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        captions = _caption_args(args, tmp)
        for n in args.images:
            src = Path(tmp) / f"in{n}"
            make_scenes(src, n)
            runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
            for round_ in range(args.repeat):  # the engines in turn, so a change in the machine's load hits all
                for name, head in ENGINES.items():
                    out = Path(tmp) / f"{n}_{name.replace(' ', '_')}_{round_}"
                    cmd = head + ["annotate", str(src), str(out), "--steps", str(args.steps), "--batch-size",
                                  str(args.batch_size), "--threads", "1", "--no-progress", "--device", "cpu"]
                    cmd += captions
                    if name.startswith("ray"):
                        cmd += ["--engine", "ray", "--ray-workers", "2"]
                        if captions and args.ray_caption_workers:
                            cmd += ["--ray-caption-workers", str(args.ray_caption_workers)]
                    r = _timed(cmd)
                    assert r["done"] == n and r["captioned"] == (n if captions else 0), (name, r)
                    runs[name].append(r)
            results[n] = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
            load.append(os.getloadavg()[0])
    what = ""
    if captions:
        what = f" + captions ({args.caption_max_tokens} tokens, {args.caption_model or 'tiny random Janus'})"
    print(f"CPU, demo model{what}, {args.steps} steps, batch {args.batch_size}, 1 thread per process, "
          f"{os.cpu_count()} cores, median of {args.repeat} round(s); 1-minute load average "
          f"{' -> '.join(f'{x:.1f}' for x in load)}")
    print(f"{'images':>6}  {'engine':<13}{'wall s':>8}{'img/s (wall)':>14}{'img/s (run)':>13}{'ratio (wall)':>14}"
          f"{'ratio (run)':>13}")
    for n, by_engine in results.items():
        base = by_engine["1 process"]
        for name, r in by_engine.items():
            print(f"{n:>6}  {name:<13}{r['wall_s']:8.1f}{r['wall_images_per_s']:14.2f}{r['run_images_per_s']:13.2f}"
                  f"{r['wall_images_per_s'] / base['wall_images_per_s']:14.2f}"
                  f"{r['run_images_per_s'] / base['run_images_per_s']:13.2f}")
    return {"images": results, "load_average": load, "steps": args.steps, "batch_size": args.batch_size,
            "captions": bool(captions), "caption_max_tokens": args.caption_max_tokens if captions else None}


def bench_gpu(args) -> dict:
    import torch
    from PIL import Image

    from jodi_core.jobs.annotate import AnnotateConfig, annotate
    from jodi_core.dcae.model import DC_AE_F32C32_SANA_1_0, DCAE
    from jodi_core.dit.model import JODI_1600M_P1_D20, JodiTransformer

    if args.tiny:  # exercises this code path anywhere: tiny random models, fp32, on the CPU
        from jodi_core.jobs.demo import tiny_random_models

        device, dtype = torch.device("cpu"), torch.float32
        dit, vae = tiny_random_models()
    elif not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (or add --tiny for a CPU smoke run).")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.manual_seed(0)
        dit = JodiTransformer(JODI_1600M_P1_D20, dtype=dtype, device=device).eval()
        vae = DCAE(DC_AE_F32C32_SANA_1_0, dtype=dtype, device=device).eval()
    with torch.no_grad():  # fan-in scaled random weights keep activations finite through 20 blocks
        for module in (dit, vae):
            for p in module.parameters():
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else p.numel()
                p.normal_(0, fan_in**-0.5)
    size = args.size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images + args.batch_size):  # smooth random images (cheap to make, realistic JPEGs)
            low = rng.random((size // 32, size // 32, 3)) * 255
            im = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC)
            sub = "warm" if i < args.batch_size else "run"
            (src / sub).mkdir(exist_ok=True)
            im.save(src / sub / f"{i:05d}.jpg", quality=90)

        def run(folder: str) -> float:
            cfg = AnnotateConfig(input=str(src / folder), output=str(Path(tmp) / f"out_{folder}"),
                                 steps=args.steps, batch_size=args.batch_size, resolution=size, device=str(device),
                                 progress=False)
            sync()
            t0 = time.perf_counter()
            summary = annotate(cfg, models=(dit, vae), device=device)
            sync()
            assert summary.done == len(list((src / folder).glob("*.jpg"))), summary
            return time.perf_counter() - t0

        run("warm")
        seconds = run("run")
        rate = args.images / seconds
        results = {"images": args.images, "seconds": seconds, "images_per_s": rate, "size": size,
                   "batch_size": args.batch_size, "steps": args.steps,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny smoke run)"}
    model = "tiny random Jodi (fp32)" if args.tiny else "1.6B Jodi (random bf16)"
    print(f"{results['device']}: {model}, {size} px, batch {args.batch_size}, {args.steps} steps, "
          f"7 labels: {rate:.2f} images/s (target >= 4.5, analytic floor 6.1)")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the real config on CUDA (see the module docstring)")
    p.add_argument("--images", type=int, nargs="+",
                   help="images to label; on CPU one or more counts, each run with every engine (default 24 96 on "
                        "CPU, 64 on GPU)")
    p.add_argument("--steps", type=int, help="sampling steps (default 4 on CPU, 20 on GPU)")
    p.add_argument("--batch-size", type=int, help="default 4 on CPU (the annotate default), 8 on GPU")
    p.add_argument("--repeat", type=int, default=1, help="CPU: rounds of all engines, medians reported")
    p.add_argument("--size", type=int, default=512, help="GPU image size and bucket resolution")
    p.add_argument("--tiny", action="store_true", help="with --gpu: tiny random models on the CPU (smoke run)")
    p.add_argument("--captions", action="store_true", help="CPU: every engine also captions with Janus")
    p.add_argument("--caption-model", metavar="JANUS_FOLDER",
                   help="with --captions: this Janus folder (default: a tiny random Janus from tests/janus_tiny.py)")
    p.add_argument("--caption-max-tokens", type=int, default=16, help="with --captions: tokens per caption")
    p.add_argument("--ray-caption-workers", type=int, help="with --captions: Janus actors of the Ray engine")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.caption_model and not args.captions:
        p.error("--caption-model needs --captions")
    if args.gpu and args.captions:
        p.error("--captions is a CPU benchmark (leave out --gpu)")
    if args.gpu:
        args.images = (args.images or [64])[0]
    else:
        args.images = args.images or [24, 96]
    args.steps = args.steps or (20 if args.gpu else 4)
    args.batch_size = args.batch_size or (8 if args.gpu else 4)
    results = bench_gpu(args) if args.gpu else bench_cpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
