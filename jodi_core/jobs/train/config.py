"""The settings of a training run: :class:`TrainConfig` (both stages; read from a JSON or YAML file and checked by
:meth:`TrainConfig.validate`), :class:`DataConfig` (where batches come from) and the tiny default models."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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
    # Which caption of a record ("caption": {captioner: text}) trains: None picks one at random each time a sample
    # is drawn (seeded by seed, epoch and index); a name picks that captioner's (e.g. the Janus folder name that
    # annotate --caption-model wrote), falling back to a random one, with a warning, where a record lacks it.
    caption_key: Optional[str] = None
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
        if self.caption_key is not None and (not isinstance(self.caption_key, str) or not self.caption_key.strip()):
            raise ValueError(f"caption_key must be a captioner name or null, got {self.caption_key!r}.")
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
