"""One process or torchrun ranks: the :func:`annotate` entry point."""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .annotator import Annotator
from .config import AnnotateConfig, AnnotateSummary
from .folders import Stopped, _writing_to
from .output import merge_outputs
from .planning import _read_jsonl, part_name, plan_work

log = logging.getLogger(__name__)


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str = "annotate"):
        self.bar = None
        self.t0 = time.perf_counter()
        self.n = 0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def __call__(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)  # tqdm shows img/s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _input_order(cfg: AnnotateConfig) -> Optional[list[str]]:
    src = Path(cfg.input)
    if src.is_file():
        return [r["image"] for r in _read_jsonl(src) if isinstance(r.get("image"), str)]
    return None


def annotate(
    cfg: AnnotateConfig,
    *,
    models=None,
    janus=None,
    placement=None,
    rank: int = 0,
    world: int = 1,
    device: Optional[torch.device] = None,
    any_stopped: Optional[Callable[[bool], bool]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
) -> AnnotateSummary:
    """Label this rank's shard and (rank 0, once every rank is done and none stopped early) merge.
    ``any_stopped(stopped)``: waits for all ranks and says whether any of them stopped (torchrun); without it this is
    the only rank. ``models``: preloaded (transformer, vae); ``janus``: a preloaded caption model (a JanusModel),
    with ``cfg.caption_name`` naming its captions; ``placement``: what moves the models between the caption and map
    phases (default :class:`ModelPlacement`).
    ``on_progress(finished, total)`` after each batch (the ComfyUI node's progress bar)."""
    cfg.validate()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output)
    with _writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    mine, complete = plan_work(cfg, rank, world)
    summary = AnnotateSummary(skipped=complete)
    if mine:
        annotator = Annotator(cfg, part_name(f"rank{rank}"), models=models, device=device,
                              should_stop=should_stop, janus=janus, placement=placement)
        bar = _Progress(len(mine), cfg.progress and rank == 0)

        def progress(n: int) -> None:
            bar(n)
            if on_progress:
                on_progress(bar.n, len(mine))

        try:
            with _writing_to(out):
                annotator.run(mine, progress)
        except Stopped:
            summary.stopped = True
        finally:
            bar.close()
        summary.done, summary.failed = annotator.done, annotator.failed
        summary.captioned, summary.captions_failed = annotator.captioned, annotator.captions_failed
    if any_stopped is not None:
        summary.stopped = any_stopped(summary.stopped)
    if rank == 0 and not summary.stopped:
        with _writing_to(out):
            merge_outputs(out, _input_order(cfg))
    summary.seconds = time.perf_counter() - t0
    return summary


def _annotate_torchrun(cfg: AnnotateConfig) -> AnnotateSummary:
    """One process per rank (``torchrun``); gloo only joins the ranks at the end (and sums their counts), the work
    needs no collectives."""
    import datetime

    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from ...loading import resolve_device

    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A long timeout: ranks may finish their shards far apart, and the barrier only waits for the slowest.
    tdist.init_process_group(backend="gloo", timeout=datetime.timedelta(days=7))
    try:

        def any_stopped(stopped: bool) -> bool:  # also the barrier before rank 0 merges
            flag = torch.tensor([int(stopped)])
            tdist.all_reduce(flag)
            return bool(flag)

        summary = annotate(cfg, rank=rank, world=world, device=device, any_stopped=any_stopped)
        totals = torch.tensor([summary.done, summary.failed, summary.skipped, summary.captioned,
                               summary.captions_failed])
        tdist.all_reduce(totals)
        (summary.done, summary.failed, summary.skipped, summary.captioned,
         summary.captions_failed) = (int(t) for t in totals)
        if summary.stopped and rank == 0:
            log.info("annotate: a rank stopped early; metadata.jsonl is merged by the next complete run")
        return summary
    finally:
        tdist.destroy_process_group()
        # Free the group while the interpreter is whole: left to interpreter shutdown, gloo's threads sometimes
        # abort a finished run ("terminate called without an active exception", exit code -6; 3 of 50 torchrun runs).
        gc.collect()

