"""Ray Data: the driver plans the work as rows of one sampler batch each (:func:`plan_batches`) and streams them
through stages, each a ``map_batches`` over its own pool of actors: captioning (:class:`RayCaptioner`), then
perception (:class:`RayAnnotator`, which writes the files and records). The driver merges the part files at the end."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ... import imaging
from .annotator import Annotator
from .config import AnnotateConfig, AnnotateSummary, WorkItem
from .engines import _Progress, _input_order
from .folders import Stopped, _writing_to
from .output import merge_outputs
from .planning import part_name, plan_work


WORK_COLUMN = "items"  # a work row: one sampler batch, the JSON list of its WorkItem rows


def _aspect_key(item: WorkItem) -> Optional[float]:
    """The aspect bucket of the item's image (a key of ``imaging.ASPECT_BUCKETS``) read from its header; None when
    the item is refused or its header unreadable (it fails in the worker, without sampling)."""
    if item.error:
        return None
    try:
        h, w = imaging.header_size(item.source)
    except (ValueError, OSError):
        return None
    if h <= 0 or w <= 0:
        return None
    return min(imaging.ASPECT_BUCKETS, key=lambda r: abs(r - h / w))


def plan_batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """``items`` cut into sampler batches for workers that get one batch per call: grouped by aspect bucket (read
    from the image headers on a few threads, without the model) and by the maps to make, each group in key order cut
    into runs of ``batch_size``, groups in the order of their first image. These are the batches
    :meth:`Annotator.run` makes of the whole list at once, except that two aspect buckets which round to one bucket
    size (small resolutions) stay apart here. Images that fail (refused, unreadable) and images with nothing to
    sample (only files to copy) are batched apart."""
    items = sorted(items, key=lambda it: it.key)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items))), thread_name_prefix="jodi-annotate-plan") as pool:
        aspects = list(pool.map(_aspect_key, items))
    groups: dict[tuple, list[WorkItem]] = {}
    for item, aspect in zip(items, aspects):
        key = ("fail",) if aspect is None else ("copy",) if not item.domains else ("sample", aspect, item.domains)
        groups.setdefault(key, []).append(item)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


COUNT_COLUMNS = ("done", "failed", "captioned", "captions_failed")  # counts a stage passes on with its rows


def _row_items(batch: dict) -> list[WorkItem]:
    return [WorkItem.from_row(row) for rows in batch[WORK_COLUMN] for row in json.loads(str(rows))]


def _carried(batch: dict) -> dict[str, int]:
    """The counts the stages before this one passed on with the rows of ``batch`` (0 where none)."""
    return {c: int(np.sum(batch[c])) if c in batch else 0 for c in COUNT_COLUMNS}


class RayCaptioner:
    """The caption stage (a Ray Data callable class): Janus loaded once per actor, no Jodi model. Each call captions
    the items of its work rows that need a caption, appends each caption record to the actor's own part file (a
    killed run loses at most the row in flight; a caption that fails goes to the actor's error log and the item's maps
    are still made) and returns once they are written: the rows go on with the items' records holding their caption
    (caption flag cleared, files already copied), plus the counts so far. Items with no maps to make are finished
    here (as in one process); with ``captions_only`` this is the only stage and finishes every item."""

    def __init__(self, cfg_dict: dict, stamp: Optional[int] = None):
        cfg = AnnotateConfig(**cfg_dict).validate()
        cfg.progress = False
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.captions_only = cfg.captions_only
        # captions_only: the Annotator loads no Jodi model; the items' maps are left to the perception stage
        self.annotator = Annotator(dataclasses.replace(cfg, captions_only=True), part_name("ray1-caption", stamp))

    def __call__(self, batch: dict) -> dict:
        ann = self.annotator
        counts = _carried(batch)
        before = {c: getattr(ann, c) for c in COUNT_COLUMNS}
        rows = []
        for text in batch[WORK_COLUMN]:
            items = [WorkItem.from_row(row) for row in json.loads(str(text))]
            try:
                rest = ann._caption_window(items, None)
                if self.captions_only:  # unreadable and copy-only items: recorded here, no maps to make
                    ann._run(rest, None)
                    rest = []
            except Stopped:  # stop_after: the row's remaining items are left to the next run
                rest = []
            ann.flush()  # the row's records are in the part file before its items go on
            rows.append(json.dumps([it.to_row() for it in rest]))
        out = {c: np.array([counts[c] + getattr(ann, c) - before[c]] + [0] * (len(rows) - 1)) for c in COUNT_COLUMNS}
        return {WORK_COLUMN: np.array(rows), **out}


class RayAnnotator:
    """The perception stage (a Ray Data callable class): one model per actor, files written by the actor itself.

    Each call labels its work rows, one sampler batch each, and returns once their records are in the actor's part
    file: a killed run loses at most the batches in flight. Two calls may run at once (``concurrent_calls`` of the
    stage, where Ray supports it): one samples while the other waits for its files, which keeps the writing of one
    batch overlapped with the sampling of the next as in one process; the model takes one batch at a time. The writer
    thread is made once and lives as long as the actor (Ray has no reliable destructor; after a call it has nothing
    left to write). The counts of the stages before it (captions) are added to its own."""

    def __init__(self, cfg_dict: dict, stamp: Optional[int] = None):
        import threading

        cfg = AnnotateConfig(**cfg_dict).validate()
        cfg.progress = False
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.annotator = Annotator(cfg, part_name("ray2-perception" if stamp is not None else "ray", stamp))
        self._model = threading.Lock()  # one batch on the model (and on the annotator's state) at a time

    def __call__(self, batch: dict) -> dict:
        items = _row_items(batch)
        counts = _carried(batch)
        with self._model:
            done0, failed0 = self.annotator.done, self.annotator.failed
            try:
                writes = self.annotator.submit(items)
            except Stopped:
                writes = []
            done, failed = self.annotator.done - done0, self.annotator.failed - failed0
        for write in writes:  # outside the lock: the next batch samples meanwhile
            write.result()
        return {"done": np.array([counts["done"] + done]), "failed": np.array([counts["failed"] + failed]),
                "captioned": np.array([counts["captioned"]]), "captions_failed": np.array([counts["captions_failed"]])}


@dataclass
class RayStage:
    """One stage of the Ray pipeline: ``map_batches`` over the callable class ``fn`` on its own pool of ``workers``
    actors, each holding ``num_gpus`` (a share of a GPU when < 1) and ``num_cpus``; ``batch_size`` work rows per
    call; ``concurrent_calls`` calls at once on each actor (threads: ``fn`` must be thread-safe; 1 where this Ray's
    ActorPoolStrategy cannot run calls concurrently). A stage before perception takes work rows and gives work rows
    (the same items, records updated)."""

    name: str
    fn: type
    kwargs: dict
    workers: int
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 1
    concurrent_calls: int = 1

    def apply(self, ds):
        import inspect

        import ray.data

        pool = {"size": self.workers}
        if self.concurrent_calls > 1 and "enable_true_multi_threading" in inspect.signature(
                ray.data.ActorPoolStrategy).parameters:
            pool.update(max_concurrent_calls_per_actor=self.concurrent_calls, enable_true_multi_threading=True)
        return ds.map_batches(self.fn, fn_constructor_kwargs=self.kwargs, batch_size=self.batch_size,
                              compute=ray.data.ActorPoolStrategy(**pool), num_gpus=self.num_gpus,
                              num_cpus=self.num_cpus, batch_format="numpy")


def _stage_config(cfg: AnnotateConfig) -> dict:
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["domains"] = list(cfg.domains)
    return cfg_dict


def _caption_gpus(cfg: AnnotateConfig, gpus_per_worker: float) -> float:
    """Each actor's GPU share when captions are on: both stages' pools share the GPUs (a caption actor and a
    perception actor on each, as the two models share one GPU in one process), so each takes half the share;
    captions only: the whole share."""
    return gpus_per_worker if cfg.captions_only else gpus_per_worker / 2


def _caption_stages(cfg: AnnotateConfig, gpu: bool, workers: int = 1, gpus_per_worker: float = 1.0,
                    stamp: Optional[int] = None) -> list[RayStage]:
    """The stages that run on the work rows before perception, each with its own actor pool and GPU share: with a
    caption model, :class:`RayCaptioner` on ``workers`` actors, each with Janus (and ``_caption_gpus`` of a GPU),
    which writes each item's caption into its record and passes the rows on; none without one."""
    if not cfg.caption_model:
        return []
    return [RayStage("caption", RayCaptioner, {"cfg_dict": _stage_config(cfg), "stamp": stamp}, workers,
                     num_gpus=_caption_gpus(cfg, gpus_per_worker) if gpu else 0, num_cpus=0 if gpu else 1)]


def _perception_stage(cfg: AnnotateConfig, gpu: bool, workers: int, gpus_per_worker: float,
                      stamp: Optional[int] = None) -> RayStage:
    """The perception stage; its config has no caption model (the caption stage wrote the captions into the
    records), so its actors never load Janus."""
    share = gpus_per_worker if not cfg.caption_model else _caption_gpus(cfg, gpus_per_worker)
    cfg = dataclasses.replace(cfg, caption_model=None, caption_name=None, captions_only=False)
    return RayStage("perception", RayAnnotator, {"cfg_dict": _stage_config(cfg), "stamp": stamp}, workers,
                    num_gpus=share if gpu else 0, num_cpus=0 if gpu else 1, concurrent_calls=2)


def _start_local_ray(ray, num_cpus: int) -> None:
    """A Ray for this run alone: ``num_cpus`` worker slots (the raylet starts that many workers ahead, which become
    the actors), no dashboard, a small object store (the rows are small; the files go straight to OUTPUT). Its
    workers run at the priority of this process: Ray lowers them to niceness 15 to keep its drivers responsive, but
    here they do all the work while the driver only waits, and the single-process and torchrun engines run at normal
    priority too."""
    niceness = "RAY_worker_niceness"  # read by the raylet and the workers it starts, which inherit this environment
    saved = os.environ.get(niceness)
    os.environ.setdefault(niceness, "0")
    try:
        ray.init(num_cpus=num_cpus, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop(niceness, None)


def _annotate_ray(cfg: AnnotateConfig, address: Optional[str] = None, workers: Optional[int] = None, *,
                  gpus_per_worker: float = 1.0, caption_workers: Optional[int] = None) -> AnnotateSummary:
    """Ray Data: the work rows (:func:`plan_batches`) stream through the caption stage (with a caption model:
    ``caption_workers`` :class:`RayCaptioner` actors with Janus each, default as many as perception actors) and the
    perception stage, ``workers`` :class:`RayAnnotator` actors with a Jodi model each (default: one per
    ``gpus_per_worker`` of the cluster's GPUs, or 1 on CPU; with captions both pools share the GPUs, each actor
    taking half of ``gpus_per_worker``); ``captions_only``: the caption stage alone. A Ray already started in this
    process, or the cluster at ``address``, is used as it is; else a local Ray is started for the run. The driver
    merges at the end."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray: install the [scale] extra (ray[data]).") from None
    if not (0 < gpus_per_worker <= 1 or (gpus_per_worker > 1 and gpus_per_worker == int(gpus_per_worker))):
        raise ValueError(f"gpus_per_worker must be a share of one GPU (0 < x <= 1) or a whole number, "
                         f"got {gpus_per_worker!r}.")
    cfg.validate()  # the caption name, among others: plan_work needs it to see the captions already made
    t0 = time.perf_counter()
    out = Path(cfg.output)
    with _writing_to(out):
        out.mkdir(parents=True, exist_ok=True)
    items, complete = plan_work(cfg)
    summary = AnnotateSummary(skipped=complete)
    if cfg.captions and not cfg.captions_only and not any(it.caption for it in items):
        cfg = dataclasses.replace(cfg, caption_model=None, caption_name=None)  # every caption exists: no Janus
    maps = not cfg.captions_only
    if items:
        started_here = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS") or None  # a running cluster: join it
        if started_here:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                slots = (max(workers or 1, 1) if maps else 0) + (max(caption_workers or workers or 1, 1)
                                                                  if cfg.caption_model else 0)
                _start_local_ray(ray, slots)
        context = ray.data.DataContext.get_current()
        quiet = {"enable_progress_bars": False, "print_on_execution_start": False}  # this draws its own bar
        saved = {k: getattr(context, k) for k in quiet if hasattr(context, k)}
        try:
            for k in saved:
                setattr(context, k, quiet[k])
            if cfg.device == "auto":
                gpu = bool(ray.cluster_resources().get("GPU", 0))
            else:
                gpu = torch.device(cfg.device).type == "cuda"
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so "auto" resolves, in the worker, to its GPU.
            cfg = dataclasses.replace(cfg, device="auto" if gpu else "cpu")
            if workers is None:
                workers = max(1, int(ray.cluster_resources().get("GPU", 0) / gpus_per_worker)) if gpu else 1
            stamp = time.time_ns()  # one launch: the caption records sort before the maps records of the same image
            stages = _caption_stages(cfg, gpu, max(caption_workers or workers, 1), gpus_per_worker, stamp)
            if maps:
                stages.append(_perception_stage(cfg, gpu, max(workers, 1), gpus_per_worker, stamp))
            ds = ray.data.from_items([{WORK_COLUMN: json.dumps([it.to_row() for it in batch])}
                                      for batch in plan_batches(items, cfg.batch_size)])
            for stage in stages:
                ds = stage.apply(ds)
            bar = _Progress(len(items), cfg.progress)
            for row in ds.iter_rows():
                summary.done += int(row["done"])
                summary.failed += int(row["failed"])
                summary.captioned += int(row["captioned"])
                summary.captions_failed += int(row["captions_failed"])
                bar(int(row["done"]) + int(row["failed"]))
            bar.close()
        finally:
            for k, v in saved.items():
                setattr(context, k, v)
            if started_here:
                ray.shutdown()
    summary.stopped = cfg.stop_after is not None and summary.done + summary.failed < len(items)
    if not summary.stopped:
        with _writing_to(out):
            merge_outputs(out, _input_order(cfg))
    summary.seconds = time.perf_counter() - t0
    return summary
