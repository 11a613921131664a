"""Training: a DC-AE on all domains' images, then a Jodi DiT with the paper's role sampling.

Stage 1 (``dcae``) trains (or fine-tunes) a :class:`~jodi_core.dcae.model.DCAE` with an L1/L2 reconstruction loss on the
images of every available domain, then measures the latent scale (``1 / std``) unless the config fixes one.
Stage 2 (``dit``) freezes the DC-AE and trains a :class:`~jodi_core.dit.model.JodiTransformer` by flow matching:

- roles per sample (Jodi ``data/datasets/jodi_dataset.py``): a task is drawn from joint / controllable / perception
  (p = 1/3 each). Joint: image and every available label generated. Controllable: image generated, each available
  label a condition or ignored (1/2 each). Perception: image a condition, each available label generated or ignored,
  uniform over the combinations that generate at least one. Missing labels are always ignored.
- timesteps: u ~ logit-normal(0, 1), sigma = shift u / (1 + (shift - 1) u) with flow shift 3, model timestep 1000 sigma;
- ``x_t = (1 - sigma) x0 + sigma noise``, target velocity ``noise - x0``, squared error on generated domains only;
- caption dropout: dropped rows use the model's stored null caption (``caption_dropout = 1`` needs no text encoder).

Checkpoints (``<output_dir>/last.pt``) hold the models, optimizer, stage, step and RNG states; a run resumes from
them. They hold tensors and plain containers only and are read with ``weights_only=True``, so a crafted file cannot
run code (:func:`read_training_state`). Batches are a pure function of (seed, step, rank), so a resumed run continues
exactly where it stopped.
Everything rank-dependent lives in :class:`Distributed` (a single process unless launched by torchrun).

Entry points: :func:`train` (a :class:`TrainConfig`) and :func:`main_train` (command-line arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...atomic import atomic_path, atomic_writer, write_atomic
from ...domains import NUM_DOMAINS, Role

logger = logging.getLogger(__name__)

GENERATE, CONDITION, IGNORE = int(Role.GENERATE), int(Role.CONDITION), int(Role.IGNORE)  # plain ints for torch.where
TASKS = ("joint", "controllable", "perception")

# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------

# A small DC-AE (compression 4, no attention) and DiT for demos and tests; real runs pass their own.
TINY_DCAE = dict(
    latent_channels=32, width_list=[32, 64, 128], encoder_depth_list=[1, 1, 1], decoder_depth_list=[1, 1, 1],
    encoder_block_types=["ResBlock"] * 3, decoder_block_types=["ResBlock"] * 3,
)  # fmt: skip
TINY_DIT = dict(hidden_size=128, depth=4, num_heads=4, caption_channels=64, model_max_length=8, base_size=16)


@dataclass
class DataConfig:
    """Where batches come from. ``kind``: ``"synthetic"`` (the seeded world) or ``"joint"`` (a Joint-1.6M folder)."""

    kind: str = "synthetic"
    root: Optional[str] = None  # the dataset folder, for kind "joint"
    size: int = 64  # square training size in pixels
    num_workers: int = 0
    fixed_batch: bool = False  # repeat the first batch every step (overfitting checks)
    domains: Optional[list] = None  # labels to read (joint); None = all
    synthetic: dict = field(default_factory=dict)  # extra SyntheticConfig fields


@dataclass
class TrainConfig:
    output_dir: str = "runs/jodi"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    mixed_precision: str = "bf16"  # "bf16" (autocast on CUDA; CPU always runs fp32) or "no"
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 8
    log_every: int = 10
    save_every: int = 500  # steps between checkpoints (and one at the end of each stage)
    resume: bool = True  # continue from <output_dir>/last.pt when it exists
    progress: bool = True
    fixed_noise: bool = False  # same noise, timesteps and roles every step (with fixed_batch: a pure overfit test)

    # Stage 1: DC-AE
    dcae: dict = field(default_factory=lambda: dict(TINY_DCAE))  # DCAEConfig fields
    dcae_checkpoint: Optional[str] = None  # initial weights (any format DCAE.from_state_dict reads)
    dcae_steps: int = 1000
    dcae_lr: float = 1e-3
    dcae_loss: str = "l1"  # "l1", "l2" or "l1+l2"
    dcae_images_per_step: int = 32  # domain images per step, drawn from the batch's available ones
    scaling_factor: Optional[float] = None  # latent scale; None: the checkpoint's, or measured after stage 1

    # Stage 2: DiT
    transformer: dict = field(default_factory=lambda: dict(TINY_DIT))  # JodiConfig fields
    transformer_checkpoint: Optional[str] = None  # initial weights; its own config wins over ``transformer``
    dit_steps: int = 2000
    dit_lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: "constant", or "cosine" down to min_lr_ratio at the stage's end
    min_lr_ratio: float = 0.1
    max_minutes: Optional[float] = None  # wall-clock budget of one launch, shared by its stages; see Deadline
    flow_shift: float = 3.0
    task_probs: tuple = (1 / 3, 1 / 3, 1 / 3)  # joint, controllable, perception
    caption_dropout: float = 1.0  # 1.0: always the null caption (no text encoder needed)
    attention_backend: str = "torch"  # linear attention with autograd

    def validate(self) -> "TrainConfig":
        for name in ("seed", "batch_size", "log_every", "save_every", "dcae_images_per_step", "dcae_steps",
                     "dit_steps", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        for name in ("dcae_lr", "dit_lr", "weight_decay", "grad_clip", "min_lr_ratio", "flow_shift", "caption_dropout",
                     "max_minutes"):
            value = getattr(self, name)
            if value is None and name == "max_minutes":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}.")
        for name in ("dcae_lr", "dit_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.data.kind not in ("synthetic", "joint"):
            raise ValueError(f"data.kind must be 'synthetic' or 'joint', got {self.data.kind!r}.")
        if self.data.kind == "joint" and not self.data.root:
            raise ValueError("data.root (a Joint-1.6M layout folder) is required for data.kind 'joint'.")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be 'bf16' or 'no', got {self.mixed_precision!r}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive (or null for no limit), got {self.max_minutes!r}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        if self.dcae_loss not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"dcae_loss must be 'l1', 'l2' or 'l1+l2', got {self.dcae_loss!r}.")
        for name in ("batch_size", "log_every", "save_every", "dcae_images_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        for name in ("dcae_steps", "dit_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if len(self.task_probs) != 3 or min(self.task_probs) < 0 or sum(self.task_probs) <= 0:
            raise ValueError(f"task_probs must be 3 non-negative weights (joint, controllable, perception), "
                             f"got {self.task_probs!r}.")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout!r}.")
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift must be positive, got {self.flow_shift!r}.")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown training config keys: {', '.join(sorted(unknown))}.")
        data = d.pop("data", {}) or {}
        if not isinstance(data, DataConfig):
            data_known = {f.name for f in dataclasses.fields(DataConfig)}
            bad = set(data) - data_known
            if bad:
                raise ValueError(f"Unknown data config keys: {', '.join(sorted(bad))}.")
            data = DataConfig(**data)
        if "task_probs" in d:
            d["task_probs"] = tuple(d["task_probs"])
        return cls(data=data, **d).validate()

    @classmethod
    def from_file(cls, path: "str | Path") -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Training config not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: reading YAML needs the pyyaml package; use a .json config.") from None
            raw = yaml.safe_load(text)
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of keys to values.")
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed hooks: the one place that knows about ranks
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """Process-group state. A single process unless started by ``torchrun`` (``WORLD_SIZE`` > 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> None:
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def device(self, requested: str) -> torch.device:
        from ...loading import resolve_device

        device = resolve_device(requested, self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def wrap(self, model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
        """DDP around ``model`` when there are several ranks. ``find_unused`` for models that skip parameters in
        some steps (the DiT prunes domains that a batch ignores everywhere)."""
        if self.world_size == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar over ranks (for logging)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def teardown(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Role and timestep sampling
# ---------------------------------------------------------------------------------------------------------------------


def sample_roles(
    available: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    task_probs: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    return_tasks: bool = False,
):
    """Jodi's training roles for a batch.

    ``available (B, 8)`` bool (domain 0, the image, must be available). Returns ``(B, 8)`` int64 roles, and with
    ``return_tasks`` the task index per row (0 joint, 1 controllable, 2 perception). A perception row without any
    available label cannot generate anything, so it falls back to joint.
    """
    if available.dim() != 2 or available.shape[1] != NUM_DOMAINS:
        raise ValueError(f"available must have shape (B, {NUM_DOMAINS}), got {tuple(available.shape)}.")
    available = available.bool().cpu()
    if not available[:, 0].all():
        raise ValueError("Every training sample needs its image (domain 0).")
    B = available.shape[0]
    probs = torch.tensor(task_probs, dtype=torch.float64)
    task = torch.multinomial(probs / probs.sum(), B, replacement=True, generator=generator)
    labels = available[:, 1:]
    task = torch.where((task == 2) & ~labels.any(1), torch.zeros_like(task), task)

    coin = torch.rand(B, NUM_DOMAINS - 1, generator=generator) < 0.5
    # Perception: uniform over the {generate, ignore} rows that generate at least one available label. Redraw rows
    # whose draw generated none (rejection sampling keeps the remaining rows uniform).
    need = (task == 2) & ~(coin & labels).any(1)
    while bool(need.any()):
        redraw = torch.rand(B, NUM_DOMAINS - 1, generator=generator) < 0.5
        coin = torch.where(need[:, None], redraw, coin)
        need = (task == 2) & ~(coin & labels).any(1)

    label_roles = torch.full((B, NUM_DOMAINS - 1), GENERATE, dtype=torch.long)  # joint
    controllable = torch.where(coin, CONDITION, IGNORE)
    perception = torch.where(coin, GENERATE, IGNORE)
    label_roles = torch.where((task == 1)[:, None], controllable, label_roles)
    label_roles = torch.where((task == 2)[:, None], perception, label_roles)
    label_roles = torch.where(labels, label_roles, torch.full_like(label_roles, IGNORE))
    image_role = torch.where(task == 2, CONDITION, GENERATE)[:, None]
    roles = torch.cat([image_role, label_roles], dim=1)
    return (roles, task) if return_tasks else roles


def sample_sigmas(n: int, flow_shift: float = 3.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logit-normal(0, 1) noise levels, shifted: ``sigma = s u / (1 + (s - 1) u)``; shape ``(n,)`` in (0, 1)."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return flow_shift * u / (1 + (flow_shift - 1) * u)


def lr_scale(step: int, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of a stage of ``total`` steps: linear warm-up over ``warmup``
    steps, then constant or a half cosine from 1 down to ``min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    roles: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared velocity error over the generated domains.

    ``x0 (B, 8, C, h, w)`` clean scaled latents, ``roles (B, 8)``, ``sigmas (B,)``, ``noise`` like ``x0``.
    Each sample's error is averaged over its generated domains, then over the batch.
    """
    s = sigmas.to(x0.dtype)[:, None, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0
    pred = model(x_t, sigmas * 1000, y, roles, mask, x0)
    gen = (roles == GENERATE).to(x0.device)  # (B, 8)
    per_domain = (pred.float() - target.float()).pow(2).mean(dim=(2, 3, 4))  # (B, 8)
    per_sample = (per_domain * gen).sum(1) / gen.sum(1).clamp(min=1)
    return per_sample.mean()


class _TrainForward(nn.Module):
    """Wraps the transformer so that DDP sees one module whose forward returns the velocity for every domain."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, y, role, mask, clean_x):
        ctx = self.transformer.prepare(role, y, mask, prune=True)
        return self.transformer.forward_prepared(x, timestep, ctx, clean_x)


# ---------------------------------------------------------------------------------------------------------------------
# Data: batch b of a run is a pure function of (seed, b, rank)
# ---------------------------------------------------------------------------------------------------------------------


class _SyntheticItems(torch.utils.data.Dataset):
    def __init__(self, world):
        self.world = world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        from ...data.synthetic import sample_to_item

        return sample_to_item(self.world[index], index)


class _StepSampler(torch.utils.data.Sampler):
    """Indices for batches ``start, start + 1, ...``: this rank's share of each global batch, in a seeded
    per-epoch permutation (or sequential for the endless synthetic world)."""

    def __init__(self, n: Optional[int], batch: int, start: int, seed: int, dist: Distributed, fixed: bool):
        self.n, self.batch, self.start, self.seed, self.dist, self.fixed = n, batch, start, seed, dist, fixed
        self._perm: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        if self.n is None:
            return position
        epoch, i = divmod(position, self.n)
        perm = self._perm.get(epoch)
        if perm is None:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            perm = self._perm[epoch]
        return int(perm[i])

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            b = 0 if self.fixed else step
            first = (b * self.dist.world_size + self.dist.rank) * self.batch
            for k in range(self.batch):
                yield self._index(first + k)
            step += 1

    def __len__(self) -> int:
        return 2**62


def make_batches(cfg: TrainConfig, start_step: int, dist: Distributed) -> Iterator[dict]:
    from ...data.joint_dataset import JointDataset, collate

    if cfg.data.kind == "synthetic":
        from ...data.synthetic import SyntheticConfig, SyntheticWorld

        world = SyntheticWorld(SyntheticConfig(height=cfg.data.size, width=cfg.data.size, seed=cfg.seed,
                                               **cfg.data.synthetic))
        dataset, n = _SyntheticItems(world), None
    else:
        dataset = JointDataset(cfg.data.root, cfg.data.size, domains=cfg.data.domains, seed=cfg.seed)
        n = len(dataset)
    sampler = _StepSampler(n, cfg.batch_size, start_step, cfg.seed, dist, cfg.data.fixed_batch)
    if cfg.data.fixed_batch:  # one batch, loaded once
        batch = collate([dataset[i] for i in itertools.islice(iter(sampler), cfg.batch_size)])
        return itertools.repeat(batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate,
        persistent_workers=cfg.data.num_workers > 0,
    )
    return iter(loader)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


# last.pt holds tensors and plain containers only (no numpy arrays, no classes), so it is read with
# torch.load(weights_only=True) and a crafted file cannot run code on resume.
CHECKPOINT_FORMAT = "jodi_core.train/2"
_CHECKPOINT_KEYS = ("stage", "step", "dcae", "transformer", "dcae_opt", "dit_opt")


def _rng_state() -> dict:
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # (older checkpoints hold numpy's own tuple)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # (all training noise comes from per-step generators)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """The noise/role generator of one step: a pure function of the run and the step, so resuming is exact."""
    salt = {"dcae": 1, "dit": 2}[stage]
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, salt, step, rank]).generate_state(1)[0]))


def read_training_state(path: "str | Path") -> dict:
    """A ``last.pt`` of :class:`Trainer`, read safely: tensors and plain containers only (``weights_only=True``).

    Files of the previous format, whose numpy RNG state is a pickled array, are read through the same narrow numpy
    allowlist as reference checkpoints (:func:`checkpoint.load_pickle_safely`). Anything else that needs Python
    objects is refused unread, and a file that is not one of our checkpoints gets a clear error.
    """
    from ...checkpoint import CheckpointError, UnsafeCheckpointError, load_pickle_safely

    path = Path(path)
    restart = (f"Move it out of {path.parent} to start the run afresh, or start a new run from the weights it "
               f"exported (transformer_checkpoint = jodi.safetensors, dcae_checkpoint = dcae.safetensors).")
    try:
        state = load_pickle_safely(path, device="cpu")
    except UnsafeCheckpointError as e:
        what = f" ({', '.join(e.globals[:5])})" if e.globals else ""
        raise CheckpointError(
            f"{path} is not a training checkpoint that can be resumed safely: it holds pickled Python objects{what} "
            f"that jodi_core never writes there, and unpickling them could run code, so it was not loaded. "
            f"{restart}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path} cannot be resumed from: {e} {restart}") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        found = f"keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a jodi_core training checkpoint (no {missing[0]!r}; found {found}). "
                              f"{restart}")
    if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}; this jodi_core reads "
                              f"{CHECKPOINT_FORMAT!r}. {restart}")
    return state


def save_safetensors(module: nn.Module, path: Path, metadata: dict) -> None:
    """Write ``module``'s weights to ``path`` all at once: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


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
            "losses": self.losses, "rng": _rng_state(), "config": self.cfg.to_dict(),
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
        _set_rng_state(state["rng"])
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
        g = _step_generator(cfg.seed, "dcae", 0 if cfg.fixed_noise else self.step, self.dist.rank)
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
        g = _step_generator(cfg.seed, "dit", 0 if cfg.fixed_noise else self.step, self.dist.rank)
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
                                       self.dist.wrap(_TrainForward(self.transformer), self.device, find_unused=True),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jodi_core train",
                                description="Train a DC-AE and a Jodi DiT (see jodi_core/jobs/train/).")
    p.add_argument("--config", help="JSON or YAML file with TrainConfig fields")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--device", help="override device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--data-root", help="train on a Joint-1.6M layout folder instead of the synthetic world")
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
