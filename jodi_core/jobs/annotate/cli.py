"""``python -m jodi_core annotate``: the command line."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from ... import imaging
from ...captioning import DEFAULT_MAX_TOKENS, DEFAULT_STYLE, caption_style
from ...domains import LABEL_NAMES
from .config import AnnotateConfig
from .engines import _annotate_torchrun, _input_order, annotate
from .folders import OutputError, _writing_to
from .output import merge_outputs
from .ray_engine import _annotate_ray

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jodi_core annotate",
                                description="Label images with Jodi perception into a Joint-1.6M layout folder.")
    p.add_argument("input", help="a folder of images (searched recursively) or a Joint-1.6M metadata.jsonl")
    p.add_argument("output", help="the output folder (may be the input's folder to fill in missing maps)")
    p.add_argument("--dit", help="Jodi DiT checkpoint (default: the embedded demo model)")
    p.add_argument("--vae", help="DC-AE checkpoint (default: the demo DC-AE)")
    p.add_argument("--domains", default="all",
                   help=f"comma-separated labels to produce (default all: {','.join(LABEL_NAMES)})")
    p.add_argument("--resolution", type=int,
                   help="bucket size: images go to the nearest official aspect bucket scaled to this size "
                        "(default: the model's training size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: each rank its LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0, help="mixed into every image's path-derived noise seed")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "euler"])
    p.add_argument("--flow-shift", type=float, default=3.0)
    p.add_argument("--fit", default=imaging.ALIGNED_FIT, choices=list(imaging.CONDITION_FITS),
                   help="stretch (default): each image is resized into its aspect bucket, so the maps line up with "
                        "it exactly; crop: cover and centre-crop as the reference app does (maps of images whose "
                        "aspect ratio is not a bucket's are then shifted near the borders)")
    p.add_argument("--caption-model", metavar="JANUS_FOLDER",
                   help="also caption every image with this Janus / Janus-Pro model folder: each record gets "
                        "\"caption\": {\"<folder name>\": \"<text>\"} (captions of other models are kept)")
    p.add_argument("--caption-style", default=DEFAULT_STYLE, type=_style_arg, metavar="STYLE",
                   help="brief (one sentence), detailed (default) or jodi-prompt (one paragraph for a "
                        "text-to-image prompt; also spelt \"for a Jodi prompt\"); the Janus Caption node's presets")
    p.add_argument("--caption-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"longest caption in tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--captions-only", action="store_true",
                   help="only fill in captions (no Jodi model is loaded; the maps are left as they are)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--stop-after", type=int, help="stop after this many images without merging (tests resuming)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", default="auto", choices=["auto", "local", "ray"],
                   help="auto: torchrun ranks when launched by torchrun, else one process; ray: Ray Data")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray started in-process)")
    p.add_argument("--ray-workers", type=int,
                   help="model replicas, one GPU each on GPU clusters (default: every GPU of the cluster; 1 on CPU)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=1.0,
                   help="GPUs per model replica on GPU clusters: a share such as 0.5 puts two on each GPU (default 1)")
    p.add_argument("--ray-caption-workers", type=int,
                   help="Janus replicas of the caption stage (default: as many as --ray-workers); with captions each "
                        "caption and each perception replica takes half of --ray-gpus-per-worker")
    p.add_argument("--merge-only", action="store_true", help="only merge the part files into metadata.jsonl")
    return p


def _style_arg(text: str) -> str:
    try:
        return caption_style(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    domains = LABEL_NAMES if args.domains.strip().lower() == "all" else [d for d in args.domains.split(",") if d]
    return AnnotateConfig(
        input=args.input, output=args.output, dit=args.dit, vae=args.vae, domains=domains, resolution=args.resolution,
        steps=args.steps, batch_size=args.batch_size, dtype=args.dtype, device=args.device, seed=args.seed,
        sampler=args.sampler, flow_shift=args.flow_shift, fit=args.fit, stop_after=args.stop_after,
        progress=not args.no_progress, threads=args.threads, caption_model=args.caption_model,
        caption_style=args.caption_style, caption_max_tokens=args.caption_max_tokens, captions_only=args.captions_only,
    ).validate()


def main_annotate(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.merge_only:
            with _writing_to(Path(cfg.output)):
                n = merge_outputs(cfg.output, _input_order(cfg))
            log.info("annotate: merged %d records into %s", n, Path(cfg.output) / "metadata.jsonl")
            return 0
        if args.engine == "ray":
            summary = _annotate_ray(cfg, args.ray_address, args.ray_workers,
                                    gpus_per_worker=args.ray_gpus_per_worker,
                                    caption_workers=args.ray_caption_workers)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            summary = _annotate_torchrun(cfg)
        else:
            summary = annotate(cfg)
    except (ValueError, FileNotFoundError) as e:
        log.error("annotate: %s", e)
        return 2
    except OutputError as e:  # one line, no traceback: the folder and the cause
        log.error("annotate: %s", e)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("%s", summary)
    return 3 if summary.stopped else 0
