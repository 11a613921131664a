"""The models, where they sit, and the labelling (and captioning) of batches of images."""

from __future__ import annotations

import collections
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ... import imaging
from ...atomic import copy_atomic, write_atomic
from ...captioning import CaptionStopped
from ...data.joint_dataset import RootGuard
from ...domains import get_domain, perception_roles
from ...sampling import Interrupted
from .config import AnnotateConfig, WorkItem
from .folders import FINGERPRINT_KEY, GRAY_FILE_DOMAINS, Stopped, _writing_to
from .output import PartWriter, _encode_image
from .planning import _fingerprint_open, image_seed, label_path, with_caption

log = logging.getLogger(__name__)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def load_models(cfg: AnnotateConfig, device: torch.device):
    """(transformer, vae) on ``device`` in the configured dtype."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.dit is None:
        from ..demo import load_demo_models

        dit, vae, _ = load_demo_models(device, dtype)
        return dit.to(device, dtype).eval(), vae.to(device, dtype).eval()
    from ...loading import load_dcae, load_jodi

    return (load_jodi(cfg.dit, dtype=dtype, device=device).eval(),
            load_dcae(cfg.vae, dtype=dtype, device=device).eval())


def load_caption_model(cfg: AnnotateConfig, device: torch.device):
    """The Janus model of ``--caption-model`` on the CPU, in the run's dtype for ``device`` (ModelPlacement moves
    it)."""
    from ...janus import load_janus

    return load_janus(cfg.caption_model, dtype=resolve_dtype(cfg.dtype, device), device="cpu")


def weight_bytes(*modules) -> int:
    """Bytes of the modules' parameters and buffers."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in [*m.parameters(), *m.buffers()])


class ModelPlacement:
    """Where the Jodi models (DiT and DC-AE) and Janus sit during a run's caption and map phases on one device (the
    command line and torchrun; the ComfyUI node leaves this to ComfyUI's model management). Decided once, logged:

    - on a device other than CUDA (the CPU), every model stays on it;
    - with one of the two only (no captions, or ``captions_only``), it stays on the device;
    - with both on CUDA, both stay on the device when its free memory, with the Jodi models loaded, holds Janus's
      weights plus ``margin`` (the larger working memory of the two phases); otherwise they take turns: Janus waits
      on the CPU while maps are made, the Jodi models while captions are written.
    """

    def __init__(self, device: torch.device, jodi: Sequence, janus, margin: int = 0):
        from ...memory import available_memory, format_bytes

        self.device = torch.device(device)
        self.jodi = [m for m in jodi if m is not None]
        self.janus = janus
        self.turns = False
        self.on_device = "jodi"
        if janus is None:
            return
        if self.device.type != "cuda" or not self.jodi:
            janus.to(self.device)
            self.on_device = "both"
            why = "captions only" if not self.jodi else f"{self.device.type}: nothing to move"
            log.info("annotate: %s on %s (%s)", "Janus" if not self.jodi else "Jodi and Janus", self.device, why)
            return
        need = weight_bytes(janus) + int(margin)
        free = available_memory(self.device)
        if free is None or free >= need:
            janus.to(self.device)
            self.on_device = "both"
            log.info("annotate: Jodi and Janus both stay on %s (%s free with Jodi loaded >= Janus %s + working "
                     "memory %s)", self.device, "?" if free is None else format_bytes(free),
                     format_bytes(weight_bytes(janus)), format_bytes(margin))
        else:
            self.turns = True
            log.info("annotate: Jodi and Janus take turns on %s (%s free with Jodi loaded < Janus %s + working "
                     "memory %s): the idle one waits on the CPU between the caption and map phases", self.device,
                     format_bytes(free), format_bytes(weight_bytes(janus)), format_bytes(margin))

    def _swap(self, to_cpu: Sequence, to_device: Sequence, name: str) -> None:
        if not self.turns or self.on_device == name:
            return
        for m in to_cpu:
            m.to("cpu")
        torch.cuda.empty_cache()
        for m in to_device:
            m.to(self.device)
        self.on_device = name

    def captions(self) -> None:
        """Before captions: Janus on the device."""
        self._swap(self.jodi, [self.janus], "janus")

    def maps(self) -> None:
        """Before maps: the Jodi models on the device."""
        self._swap([self.janus], self.jodi, "jodi")


def read_image(path: "str | Path") -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1], upright and 8-bit RGB whatever the file's mode (:func:`imaging.load_rgb8`);
    a ValueError saying why for anything unreadable or larger than ``imaging.MAX_IMAGE_PIXELS``."""
    return read_source(path)[0]


def read_source(path: "str | Path") -> tuple[torch.Tensor, dict]:
    """The image (as :func:`read_image`) and the :func:`fingerprint` of the very bytes it was decoded from."""
    with open(path, "rb") as f:
        fp = _fingerprint_open(f)
        if fp["size"] == 0:
            raise ValueError("cannot read image: empty file (0 bytes)")
        arr = imaging.load_rgb8(f)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255, fp  # (H, W, 3) -> (3, H, W)


def _upright_copy(src: "str | Path") -> Optional[bytes]:
    """The source re-encoded upright when its EXIF orientation turns it, else None (copied byte for byte)."""
    try:
        return imaging.upright_copy(src)
    except Exception as e:  # Pillow cannot re-encode it: the byte copy still shows upright in viewers
        log.warning("annotate: %s: cannot write an upright copy (%s); copied as it is", src, e)
        return None


class Annotator:
    """Holds the pipeline once and labels lists of :class:`WorkItem`, writing their files and records.

    Used as is by the single-process and torchrun engines, and wrapped by the Ray engine's per-worker class.
    ``on_progress(n)`` is called after each batch with the number of images finished (done or failed). Encoding and
    writing the maps runs on one background thread (in order), overlapping the next batch's sampling; :meth:`run`
    returns only once every record of its items is written. The thread is made once and lives until :meth:`close`
    (``run(..., close=False)`` keeps it for the next call: a Ray worker runs one batch per call).
    """

    MAX_PENDING_BATCHES = 2  # bounds the maps held in memory while the writer catches up

    def __init__(self, cfg: AnnotateConfig, writer_name: str, *, models=None, device: Optional[torch.device] = None,
                 should_stop: Optional[Callable[[], bool]] = None, janus=None, placement=None):
        from ...pipeline import JodiPipeline

        self.cfg = cfg
        self.out = Path(cfg.output)
        from ...loading import resolve_device  # on use: the ComfyUI node imports this module for its path checks

        self.device = device or resolve_device(cfg.device)
        self.pipe = self.resolution = None
        if not cfg.captions_only:
            dit, vae = models if models is not None else load_models(cfg, self.device)
            self.pipe = JodiPipeline(dit, vae)
            self.resolution = int(cfg.resolution or self.pipe.base_size)
        self.captioner = None
        if cfg.captions:
            self._setup_captions(janus, placement, should_stop)
        elif placement is not None:
            self.placement = placement
        else:
            self.placement = ModelPlacement(self.device, [], None)
        with _writing_to(self.out):
            self.writer = PartWriter(self.out, writer_name)
        self._out_guard = RootGuard(self.out)
        self.should_stop = should_stop
        self.done = self.failed = 0
        self.captioned = self.captions_failed = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: collections.deque = collections.deque()

    def _fail(self, item: WorkItem, reason: str) -> None:
        log.warning("annotate: %s failed: %s", item.source, reason)
        self.writer.failed(item.key, item.source, reason)
        self.failed += 1

    # ---- captions ---------------------------------------------------------------------------------------------------

    CAPTION_WINDOW = 64  # images captioned before their maps are made (at least 16 batches)

    def _setup_captions(self, janus, placement, should_stop) -> None:
        from ...captioning import Captioner

        cfg = self.cfg
        if janus is None:
            janus = load_caption_model(cfg, self.device)
        self.captioner = Captioner(janus, cfg.caption_style, cfg.caption_max_tokens, seed=cfg.seed,
                                   should_stop=should_stop)
        if placement is None:
            margin = 1 << 30
            margin += janus.kv_cache_bytes(1, janus.prompt_length(self.captioner.question, 1) + cfg.caption_max_tokens)
            if self.pipe is not None:
                margin = max(margin, (1 << 30) + self.pipe.working_memory(
                    cfg.batch_size, perception_roles(cfg.domains), self.resolution, self.resolution, use_cfg=False))
            jodi = [] if self.pipe is None else [self.pipe.transformer, self.pipe.vae]
            placement = ModelPlacement(self.device, jodi, janus, margin)
        self.placement = placement

    def _windows(self, items: Sequence[WorkItem]) -> Iterator[Sequence[WorkItem]]:
        """All items at once, or with captions to write, windows of them: their captions, then their maps."""
        if self.captioner is None or not any(it.caption for it in items):
            yield items
            return
        size = max(self.CAPTION_WINDOW, 16 * self.cfg.batch_size)
        for i in range(0, len(items), size):
            yield items[i : i + size]

    def _caption_window(self, items: Sequence[WorkItem],
                        on_progress: Optional[Callable[[int], None]]) -> list[WorkItem]:
        """Caption the items that need it and record each caption at once (a record with the caption; the maps
        follow in the map phase). Returns the items that still need maps (or, unreadable, an error recorded)."""
        if self.captioner is None or not any(it.caption and not it.error for it in items):
            return list(items)
        self.placement.captions()
        rest = []
        for item in items:
            if not item.caption or item.error:
                rest.append(item)
                continue
            self._check_stop()
            try:
                image, fp = read_source(item.source)
            except (ValueError, OSError):
                rest.append(item)  # the map phase reads it again and records why
                continue
            item.caption = False
            try:
                text = self.captioner.caption(image, item.key)
            except CaptionStopped as e:  # the image is redone by the next run
                raise Stopped() from e
            except Exception as e:  # noqa: BLE001 (one image's failure must not end the run)
                reason = f"caption by {self.cfg.caption_name} failed: {type(e).__name__}: {e}"
                log.warning("annotate: %s: %s", item.source, reason)
                self.writer.failed(item.key, item.source, reason, caption_model=self.cfg.caption_name)
                self.captions_failed += 1
                text = None
            if text is not None:
                item.record = with_caption(item.record, self.cfg.caption_name, text)
                self.captioned += 1
            if item.domains:
                if text is not None:  # recorded now, so that a stopped run keeps it; the maps add to the record
                    self._submit_write(self._caption_record(item, fp), tuple(image.shape[-2:]), {})
                    item.copies = []
                rest.append(item)
                continue
            if text is None and not item.copies:
                self.failed += 1  # nothing to write for it
            else:
                self._submit_write(self._caption_record(item, fp), tuple(image.shape[-2:]), {})
                self.done += 1
            if on_progress:
                on_progress(1)
        return rest

    @staticmethod
    def _caption_record(item: WorkItem, fp: dict) -> WorkItem:
        """A copy of ``item`` to write its record with the caption (before or without its maps). The source's
        fingerprint is updated unless maps of an older source may be in the record: those keep the old one, so
        that a later run still sees the change."""
        old = item.record.get(FINGERPRINT_KEY)
        stale = isinstance(old, dict) and (bool(item.domains) or (old.get("size"), old.get("sha256")) != (
            fp["size"], fp["sha256"]))
        return dataclasses.replace(item, record=dict(item.record), copies=list(item.copies),
                                   fingerprint=None if stale else fp)

    def _maps_window(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]]) -> None:
        if any(it.domains for it in items):
            self.placement.maps()
        self._run(items, on_progress)

    def _check_stop(self) -> None:
        if self.cfg.stop_after is not None and self.done >= self.cfg.stop_after:
            raise Stopped()
        if self.should_stop is not None and self.should_stop():
            raise Stopped()

    def run(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]] = None, *,
            close: bool = True) -> None:
        """Label ``items``: read each, group by (bucket, maps to make), batch, sample, write. With a caption model,
        a window of items at a time is captioned first, then labelled. Every record of ``items`` is in the part file
        when this returns (or raises); ``close=False`` keeps the writer thread for the next call."""
        try:
            for window in self._windows(items):
                self._maps_window(self._caption_window(window, on_progress), on_progress)
        finally:
            try:
                self.flush()
            finally:
                if close:
                    self._end_pool()

    def submit(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]] = None) -> list:
        """Label ``items`` as :meth:`run` does, but return the futures of their writes still running instead of
        waiting for them (the caller waits before it counts the items as recorded): the next batch may sample
        meanwhile. On an exception the writes of the items finished before it are waited for first."""
        try:
            self._run(items, on_progress)
        except BaseException:
            self.flush()
            raise
        pending, self._pending = list(self._pending), collections.deque()
        return pending

    def flush(self) -> None:
        """Wait for the background writes; re-raise the first that failed."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Finish the background writes and end the writer thread (a later :meth:`run` starts a new one)."""
        try:
            self.flush()
        finally:
            self._end_pool()

    def _end_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _submit_write(self, item: WorkItem, size: tuple[int, int], maps: dict[str, torch.Tensor]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jodi-annotate-write")
        self._pending.append(self._pool.submit(self._write, item, size, maps))
        while len(self._pending) > self.MAX_PENDING_BATCHES * self.cfg.batch_size:
            self._pending.popleft().result()

    def _run(self, items: Sequence[WorkItem], on_progress: Optional[Callable[[int], None]]) -> None:
        groups: dict[tuple, list] = {}
        for item in items:
            self._check_stop()
            try:
                if item.error:
                    raise ValueError(item.error)
                image, item.fingerprint = read_source(item.source)
            except (ValueError, OSError) as e:
                self._fail(item, str(e))
                if on_progress:
                    on_progress(1)
                continue
            if not item.domains:  # every map exists already; only the files still need copying into the output
                self._write(item, tuple(image.shape[-2:]), {})
                self.done += 1
                if on_progress:
                    on_progress(1)
                continue
            H, W = image.shape[-2:]
            bucket = imaging.snap_to_bucket(H, W, self.resolution, self.pipe.compression)
            group = groups.setdefault((bucket, item.domains), [])
            group.append((item, image))
            if len(group) == self.cfg.batch_size:
                self._run_batch(bucket, item.domains, groups.pop((bucket, item.domains)), on_progress)
        for (bucket, domains), group in list(groups.items()):
            self._check_stop()
            self._run_batch(bucket, domains, group, on_progress)

    @torch.no_grad()
    def _run_batch(self, bucket, domains, group, on_progress) -> None:
        self._check_stop()
        if self.cfg.stop_after is not None:  # never finish more than stop_after images
            group = group[: max(0, self.cfg.stop_after - self.done)]
            if not group:
                raise Stopped()
        work_h, work_w = bucket
        roles = perception_roles(domains)
        cond = torch.stack([imaging.fit_condition(img[None], work_h, work_w, self.cfg.fit)[0] for _, img in group])
        try:
            result = self.pipe(
                roles, work_h, work_w, conditions={"image": cond}, steps=self.cfg.steps, cfg_scale=1.0,
                flow_shift=self.cfg.flow_shift, sampler=self.cfg.sampler, seeds=[image_seed(it.key, self.cfg.seed)
                                                                               for it, _ in group],
                snap_to_bucket=False, decode=False, should_stop=self.should_stop,  # stop between steps, too
            )
        except Interrupted as e:  # the batch is dropped; it is redone by the next run
            raise Stopped() from e
        maps = self._decode(result.latents, domains, [tuple(img.shape[-2:]) for _, img in group])
        for i, (item, image) in enumerate(group):
            self._submit_write(item, tuple(image.shape[-2:]), {name: m[i] for name, m in maps.items()})
            self.done += 1
        if on_progress:
            on_progress(len(group))

    def _decode(self, latents: torch.Tensor, domains, sizes) -> dict[str, list[torch.Tensor]]:
        """Decode each domain as one batch, then resize each sample to its own image size and post-process."""
        from ...ops import compute_dtype  # an fp8-stored VAE computes in its norms' dtype

        vae, pipe = self.pipe.vae, self.pipe
        p = next(vae.parameters())
        out: dict[str, list[torch.Tensor]] = {}
        for name in domains:
            d = get_domain(name)
            z = latents[:, d.index].to(device=p.device, dtype=compute_dtype(vae, p.dtype)) / pipe.scaling_factor
            x = vae.decode(z).float()  # (B, 3, h*f, w*f) in about [-1, 1]
            # resize and post-process on the VAE's device; only the finished maps travel to the CPU
            out[name] = [d.postprocess(imaging.resize(x[i : i + 1], h, w).clamp(-1, 1))[0].cpu()
                         for i, (h, w) in enumerate(sizes)]
        return out

    def _write(self, item: WorkItem, size: tuple[int, int], maps: dict[str, torch.Tensor]) -> None:
        # image and info first, as in Joint-1.6M; the input's other fields (captions, ...) are kept
        record = {"image": item.key, "info": dict(item.record.get("info") or {}), **item.record}
        record["image"] = item.key
        for src, rel in item.copies:
            upright = _upright_copy(src) if rel == item.key else None
            if upright is None:
                copy_atomic(Path(src), self._dest(rel))
            else:  # the maps are upright, so is the image beside them (whatever reads it)
                write_atomic(self._dest(rel), upright)
        for name, x in maps.items():
            rel = label_path(item.key, name)
            seg = name == "segmentation"
            data = _encode_image(x, "PNG" if seg else "JPEG", name in GRAY_FILE_DOMAINS, self.cfg.jpeg_quality)
            write_atomic(self._dest(rel), data)
            record[get_domain(name).metadata_key] = rel
        record["info"] = {**dict(record.get("info") or {}), "height": int(size[0]), "width": int(size[1])}
        if item.fingerprint is not None:
            record[FINGERPRINT_KEY] = item.fingerprint
        self.writer.done(record)  # last: the image counts as done only once every file exists

    def _dest(self, rel: str) -> Path:
        """``OUTPUT/rel``, checked again at write time (plan_work refused such paths already)."""
        if not self._out_guard.contains(rel):
            raise ValueError(f"refusing to write {rel!r} outside the output folder {self.out}")
        return self.out / rel
