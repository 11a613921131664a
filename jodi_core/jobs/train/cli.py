"""``python -m jodi_core train``: the command line over :func:`~.trainer.train` (a config file and a few overrides).
Exit status 0 when the run finished, 3 when ``max_minutes`` stopped it first (run the same command again to go on)."""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from .config import TrainConfig
from .trainer import train

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jodi_core train",
                                description="Train a DC-AE and a Jodi DiT (see jodi_core/jobs/train/).")
    p.add_argument("--config", help="JSON or YAML file with TrainConfig fields")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--device", help="override device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--data-root", help="train on a Joint-1.6M layout folder instead of the synthetic world")
    p.add_argument("--caption-key", metavar="KEY",
                   help="override caption_key: this captioner's captions (e.g. the Janus folder name annotate "
                        "--caption-model wrote) for the text encoder of train() in Python; this command has none and "
                        "trains with the null caption")
    p.add_argument("--dcae-steps", type=int)
    p.add_argument("--dit-steps", type=int)
    p.add_argument("--max-minutes", type=float,
                   help="override max_minutes: wall-time budget of this launch, shared by the stages (run again to go on)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    return p


def main_train(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.device:
        cfg.device = args.device
    if args.data_root:
        cfg.data.kind, cfg.data.root = "joint", args.data_root
    if args.caption_key is not None:
        cfg.caption_key = args.caption_key
    if args.dcae_steps is not None:
        cfg.dcae_steps = args.dcae_steps
    if args.dit_steps is not None:
        cfg.dit_steps = args.dit_steps
    if args.max_minutes is not None:
        cfg.max_minutes = args.max_minutes
    if args.no_resume:
        cfg.resume = False
    result = train(cfg.validate())
    if result.dcae_path is None and result.transformer_path is None and not result.finished:
        logger.info("stopped by max_minutes in the DC-AE stage; run the same command again to resume")
    elif result.transformer_path is not None:
        logger.info("%s: %s, %s (latent scale %.5f)", "done" if result.finished else
                    "stopped by max_minutes (weights as of the last step; run again to go on)",
                    result.dcae_path, result.transformer_path, result.scaling_factor)
    return 0 if result.finished else 3
