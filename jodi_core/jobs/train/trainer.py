"""The trainer: :class:`Trainer` owns the models, optimizers and loop state of one run (the DC-AE stage, the latent
scale, the DiT stage, saving and resuming), :func:`train` runs or resumes both stages; with them the learning-rate
schedule (:func:`lr_scale`) and the ``max_minutes`` budget of a launch (:class:`Deadline`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from ...atomic import atomic_writer, write_atomic
from .batches import make_batches
from .checkpoints import CHECKPOINT_FORMAT, read_training_state, rng_state, save_safetensors, set_rng_state
from .config import TrainConfig
from .distributed import Distributed
from .objective import TrainForward, flow_matching_loss, sample_roles, sample_sigmas, step_generator

logger = logging.getLogger(__name__)


def lr_scale(step: int, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of a stage of ``total`` steps: linear warm-up over ``warmup``
    steps, then constant or a half cosine from 1 down to ``min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    output_dir: Path
    dcae_losses: list
    dit_losses: list
    scaling_factor: float
    dcae_path: Optional[Path]
    transformer_path: Optional[Path]
    finished: bool = True  # False when max_minutes stopped the run before its last step


class Deadline:
    """The ``max_minutes`` budget of one launch (``None``: no budget), shared by its stages.

    :meth:`reached` is called once per step; it reads the clock, averaged over ranks so that every rank stops at the
    same step and uses the same learning rate.
    """

    def __init__(self, max_minutes: Optional[float], dist: Optional["Distributed"] = None,
                 device: "torch.device | str" = "cpu"):
        self.budget_s = None if max_minutes is None else 60.0 * max_minutes
        self.dist, self.device = dist, device
        self.t0 = time.monotonic()
        self.fraction = 0.0  # of the budget spent, as of the last reached()

    def reached(self) -> bool:
        if self.budget_s is None:
            return False
        fraction = torch.tensor((time.monotonic() - self.t0) / self.budget_s, device=self.device)
        if self.dist is not None:
            fraction = self.dist.mean(fraction)
        self.fraction = float(fraction)
        return self.fraction >= 1.0

    def stage_clock(self, start_step: int, total: int) -> Callable[[], int]:
        """For a stage starting now at ``start_step`` of ``total``: the step that the time spent since then stands
        for, if the stage is to end with the budget."""
        f0 = self.fraction

        def by_clock() -> int:
            progress = 1.0 if f0 >= 1.0 else (self.fraction - f0) / (1.0 - f0)
            return start_step + int(progress * (total - start_step))

        return by_clock


class Trainer:
    """Owns the models, optimizers and loop state of one run. :func:`train` is the usual entry."""

    def __init__(self, cfg: TrainConfig, caption_encoder: Optional[Callable] = None,
                 dist: Optional[Distributed] = None):
        from ...dcae.model import DCAE, DCAEConfig
        from ...dit.model import JodiConfig, JodiTransformer

        self.cfg = cfg.validate()
        self.dist = dist or Distributed.from_env()
        self.device = self.dist.device(cfg.device)
        self.dist.setup(self.device)
        if cfg.caption_dropout < 1 and caption_encoder is None:
            raise ValueError("caption_dropout < 1 needs a caption_encoder (captions -> (y, mask)); "
                             "use caption_dropout = 1 to train with the null caption only.")
        if cfg.caption_key is not None and cfg.caption_dropout >= 1:
            logger.warning("caption_key %r has no effect: caption_dropout is 1, so every step trains with the null "
                           "caption (the command line has no text encoder). To train on the captions, call "
                           "jodi_core.jobs.train.train(cfg, caption_encoder) with caption_dropout < 1.",
                           cfg.caption_key)
        self.caption_encoder = caption_encoder
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)

        # Checkpoints load through jodi_core.loading, which also reads what shapes cannot tell (base_size, the latent
        # scale) from the file's metadata; a DiT built with another base_size has other positional embeddings.
        if cfg.dcae_checkpoint:
            from ...loading import load_dcae

            self.dcae = load_dcae(cfg.dcae_checkpoint, dtype=torch.float32).requires_grad_(True)
        else:
            self.dcae = DCAE(DCAEConfig(**cfg.dcae))
        self.dcae.to(self.device).float()
        f = self.dcae.spatial_compression
        if cfg.data.size % f:
            raise ValueError(f"data.size {cfg.data.size} must be a multiple of the DC-AE's compression {f}.")
        self.scaling_factor = cfg.scaling_factor
        if self.scaling_factor is None and cfg.dcae_checkpoint and cfg.dcae_steps == 0:
            self.scaling_factor = self.dcae.scaling_factor

        if cfg.transformer_checkpoint:
            from ...loading import load_jodi

            self.transformer = load_jodi(cfg.transformer_checkpoint, dtype=torch.float32,
                                         attention_backend=cfg.attention_backend).requires_grad_(True)
        else:
            tcfg = JodiConfig(**{"in_channels": self.dcae.latent_channels, **cfg.transformer})
            self.transformer = JodiTransformer(tcfg, attention_backend=cfg.attention_backend)
        if self.transformer.config.in_channels != self.dcae.latent_channels:
            raise ValueError(f"The transformer takes {self.transformer.config.in_channels} latent channels but the "
                             f"DC-AE makes {self.dcae.latent_channels}.")
        self.transformer.to(self.device).float()

        self.dcae_opt = torch.optim.AdamW(self.dcae.parameters(), lr=cfg.dcae_lr, weight_decay=cfg.weight_decay)
        self.dit_opt = torch.optim.AdamW(self.transformer.parameters(), lr=cfg.dit_lr, weight_decay=cfg.weight_decay)
        self.stage, self.step = "dcae", 0
        self.losses = {"dcae": [], "dit": []}
        # Where the stage's lr schedule stands: ahead of the step when max_minutes makes the clock lead; saved, so
        # that a relaunch goes on from there instead of jumping back up.
        self.schedule_pos = 0
        self._clock: Optional[Callable[[], int]] = None  # the running stage's Deadline.stage_clock

    # ---- state ------------------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "last.pt"

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step, "scaling_factor": self.scaling_factor,
            "dcae": self.dcae.state_dict(), "transformer": self.transformer.state_dict(),
            "dcae_opt": self.dcae_opt.state_dict(), "dit_opt": self.dit_opt.state_dict(),
            "losses": self.losses, "rng": rng_state(), "config": self.cfg.to_dict(),
            "schedule_pos": self.schedule_pos,
        }  # fmt: skip

    def save(self, path: Optional[Path] = None) -> None:
        if self.dist.is_main:
            path = path or self.checkpoint_path
            with atomic_writer(path) as f:  # never leave a half-written checkpoint behind
                torch.save(self.state_dict(), f)
        self.dist.barrier()

    def load(self, path: Path) -> None:
        state = read_training_state(path)
        self.dcae.load_state_dict(state["dcae"])
        self.transformer.load_state_dict(state["transformer"])
        self.dcae_opt.load_state_dict(state["dcae_opt"])
        self.dit_opt.load_state_dict(state["dit_opt"])
        self.stage, self.step = state["stage"], int(state["step"])
        self.scaling_factor = state.get("scaling_factor", self.scaling_factor)
        self.losses = state.get("losses", self.losses)
        self.schedule_pos = int(state.get("schedule_pos", self.step))
        set_rng_state(state["rng"])
        logger.info("resumed from %s at stage %s step %d", path, self.stage, self.step)

    # ---- helpers ----------------------------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.cfg.mixed_precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _progress(self, stage: str, total: int):
        return _Progress(f"{stage}", total, self.step, self.cfg.log_every,
                         enabled=self.cfg.progress and self.dist.is_main)

    def _lr_scale(self, step: int, total: int) -> float:
        cfg = self.cfg
        if step >= cfg.warmup_steps:  # the clock never cuts the warm-up short
            by_clock = self._clock() if self._clock is not None else step
            self.schedule_pos = min(max(total - 1, 0), max(step, self.schedule_pos, by_clock))
            step = self.schedule_pos
        return lr_scale(step, total, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)

    # ---- stage 1 ----------------------------------------------------------------------------------------------------

    def dcae_step(self, batch: dict, model: nn.Module) -> float:
        cfg = self.cfg
        g = step_generator(cfg.seed, "dcae", 0 if cfg.fixed_noise else self.step, self.dist.rank)
        images = batch["pixels"][batch["available"]]  # (M, 3, H, W) every available domain image
        if images.shape[0] > cfg.dcae_images_per_step:
            pick = torch.randperm(images.shape[0], generator=g)[: cfg.dcae_images_per_step]
            images = images[pick]
        images = images.to(self.device)
        for group in self.dcae_opt.param_groups:
            group["lr"] = cfg.dcae_lr * self._lr_scale(self.step, cfg.dcae_steps)
        with self._autocast():
            recon = model(images)
        err = recon.float() - images
        loss = {"l1": lambda: err.abs().mean(), "l2": lambda: err.pow(2).mean(),
                "l1+l2": lambda: err.abs().mean() + err.pow(2).mean()}[cfg.dcae_loss]()
        self.dcae_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.dcae.parameters(), cfg.grad_clip)
        self.dcae_opt.step()
        return float(self.dist.mean(loss.detach()))

    @torch.no_grad()
    def measure_scaling_factor(self, batches: Iterator[dict], n_batches: int = 4) -> float:
        self.dcae.eval()
        latents = []
        for _ in range(n_batches):
            batch = next(batches)
            with self._autocast():
                latents.append(self.dcae.encode(batch["pixels"][batch["available"]].to(self.device)).float())
        std = torch.cat([z.flatten() for z in latents]).std()
        std = self.dist.mean(std)
        return float(1.0 / std.clamp(min=1e-6))

    # ---- stage 2 ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_domains(self, pixels: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``(B, 8, 3, H, W)`` images -> ``(B, 8, C, h, w)`` scaled latents; missing domains stay zero."""
        B, L = pixels.shape[:2]
        flat = pixels.flatten(0, 1)  # (B*8, 3, H, W)
        keep = available.flatten().to(flat.device)
        with self._autocast():
            z = self.dcae.encode(flat[keep].to(self.device)).float()
        out = torch.zeros(B * L, *z.shape[1:], device=self.device)
        out[keep.to(self.device)] = z * self.scaling_factor
        return out.unflatten(0, (B, L))

    def dit_step(self, batch: dict, model: nn.Module) -> float:
        cfg = self.cfg
        g = step_generator(cfg.seed, "dit", 0 if cfg.fixed_noise else self.step, self.dist.rank)
        available = batch["available"]
        roles = sample_roles(available, g, cfg.task_probs)
        x0 = self.encode_domains(batch["pixels"], available)
        B = x0.shape[0]
        sigmas = sample_sigmas(B, cfg.flow_shift, g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        y = mask = None
        if cfg.caption_dropout < 1:
            drop = torch.rand(B, generator=g) < cfg.caption_dropout
            y, mask = self.caption_encoder(batch["caption"])
            y, mask = y.to(self.device), mask.to(self.device)
            null = self.transformer.y_embedder.y_embedding.to(y.dtype)
            y = y.reshape(B, -1, *null.shape[-1:])
            y = torch.where(drop.to(self.device)[:, None, None], null[None], y)[:, None]
            mask = torch.where(drop.to(self.device)[:, None], torch.ones_like(mask), mask)
        for group in self.dit_opt.param_groups:
            group["lr"] = cfg.dit_lr * self._lr_scale(self.step, cfg.dit_steps)
        with self._autocast():
            loss = flow_matching_loss(model, x0, roles.to(self.device), sigmas, noise, y, mask)
        self.dit_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.transformer.parameters(), cfg.grad_clip)
        self.dit_opt.step()
        return float(self.dist.mean(loss.detach()))

    # ---- the run ----------------------------------------------------------------------------------------------------

    def _run_stage(self, stage: str, total: int, step_fn, model: nn.Module, deadline: Deadline) -> bool:
        """Run ``stage`` up to ``total`` steps; False if the launch's ``max_minutes`` ran out first (checkpoint
        written). With a budget, the learning-rate schedule follows whichever is further along, the steps or the
        clock, so a cosine decay still reaches its floor when the time is up."""
        cfg = self.cfg
        batches = make_batches(cfg, self.step, self.dist)
        bar = self._progress(stage, total)
        deadline.reached()  # the budget spent before this stage (the other stage, start-up)
        self._clock = deadline.stage_clock(max(self.step, self.schedule_pos), total) if deadline.budget_s else None
        try:
            while self.step < total:
                if deadline.reached():
                    if self.dist.is_main:
                        logger.info("%s: max_minutes=%s reached at step %d of %d", stage, cfg.max_minutes,
                                    self.step, total)
                    self.save()
                    return False
                loss = step_fn(next(batches), model)
                self.losses[stage].append(loss)
                self.step += 1
                bar.update(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{stage} loss became {loss} at step {self.step}; lower the learning "
                                             f"rate.")
                if self.step % cfg.save_every == 0 or self.step == total:
                    self.save()
            return True
        finally:
            bar.close()
            self._clock = None

    def _resume_if_possible(self) -> None:
        found = self.cfg.resume and self.checkpoint_path.is_file()
        agreed = float(self.dist.mean(torch.tensor(float(found), device=self.device)))
        if agreed not in (0.0, 1.0):
            raise RuntimeError(f"Only some ranks see the checkpoint {self.checkpoint_path}; output_dir must be a "
                               f"folder that every rank shares.")
        if found:
            self.load(self.checkpoint_path)

    def run(self) -> TrainResult:
        cfg = self.cfg
        deadline = Deadline(cfg.max_minutes, self.dist, self.device)
        self._resume_if_possible()
        dcae_path = transformer_path = None

        if self.stage == "dcae":
            if self.step < cfg.dcae_steps:
                self.dcae.train()
                finished = self._run_stage("dcae", cfg.dcae_steps, self.dcae_step,
                                           self.dist.wrap(_AutoEncoder(self.dcae), self.device), deadline)
                if not finished:  # out of time: nothing to export yet; the next launch resumes from the checkpoint
                    return TrainResult(self.out, list(self.losses["dcae"]), list(self.losses["dit"]),
                                       float("nan"), None, None, finished=False)
            self.dcae.eval()
            if self.scaling_factor is None:
                self.scaling_factor = self.measure_scaling_factor(make_batches(cfg, 10**6, self.dist))
                logger.info("latent scaling factor %.5f", self.scaling_factor)
            self.stage, self.step, self.schedule_pos = "dit", 0, 0
            self.save()
        self.dcae.eval().requires_grad_(False)
        if self.dist.is_main:
            dcae_path = self.out / "dcae.safetensors"
            save_safetensors(self.dcae, dcae_path, {"scaling_factor": self.scaling_factor,
                                                    "config": json.dumps(dataclasses.asdict(self.dcae.config))})

        finished = True
        if self.step < cfg.dit_steps:
            self.transformer.train()
            finished = self._run_stage("dit", cfg.dit_steps, self.dit_step,
                                       self.dist.wrap(TrainForward(self.transformer), self.device, find_unused=True),
                                       deadline)
        self.transformer.eval()
        if self.dist.is_main:  # also when out of time: the weights as they are (the schedule has reached its floor)
            transformer_path = self.out / "jodi.safetensors"
            save_safetensors(self.transformer, transformer_path, {
                "config": json.dumps(dataclasses.asdict(self.transformer.config)),
                "scaling_factor": self.scaling_factor, "dit_step": self.step})
            summary = {"finished": finished, "dit_step": self.step, "dit_steps": cfg.dit_steps,
                       "scaling_factor": self.scaling_factor, "dcae_final_loss": _tail(self.losses["dcae"]),
                       "dit_final_loss": _tail(self.losses["dit"]), "config": cfg.to_dict()}
            write_atomic(self.out / "train_summary.json", json.dumps(summary, indent=2).encode())
        self.dist.barrier()
        return TrainResult(self.out, list(self.losses["dcae"]), list(self.losses["dit"]), float(self.scaling_factor),
                           dcae_path, transformer_path, finished=finished)


class _AutoEncoder(nn.Module):
    def __init__(self, dcae: nn.Module):
        super().__init__()
        self.dcae = dcae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dcae.encode(x)
        return self.dcae.decode(z.to(x.dtype))  # under autocast the latent comes out in bf16


def _tail(losses: list, n: int = 20) -> Optional[float]:
    return float(np.mean(losses[-n:])) if losses else None


class _Progress:
    """tqdm when installed, otherwise a log line every ``log_every`` steps."""

    def __init__(self, desc: str, total: int, initial: int, log_every: int, enabled: bool):
        self.desc, self.total, self.n, self.log_every, self.enabled = desc, total, initial, log_every, enabled
        self.bar = None
        self.t0 = time.perf_counter()
        self.recent: list = []
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.n += 1
        self.recent = (self.recent + [loss])[-self.log_every:]
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{np.mean(self.recent):.4f}")
        elif self.n % self.log_every == 0 or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            logger.warning("%s step %d/%d loss %.4f (%.2f steps/s)", self.desc, self.n, self.total,
                           np.mean(self.recent), rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(config: "TrainConfig | dict", caption_encoder: Optional[Callable] = None) -> TrainResult:
    """Run (or resume) both stages. ``caption_encoder(captions: list[str]) -> (y (B, S, Cc), mask (B, S))`` is only
    needed when ``caption_dropout < 1``."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    trainer = Trainer(cfg, caption_encoder)
    try:
        return trainer.run()
    finally:
        trainer.dist.teardown()
