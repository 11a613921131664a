"""Training: a DC-AE on all domains' images, then a Jodi DiT with the paper's role sampling.

Stage 1 (``dcae``) trains (or fine-tunes) a :class:`~jodi_core.dcae.model.DCAE` with an L1/L2 reconstruction loss on
the images of every available domain, then measures the latent scale (``1 / std``) unless the config fixes one.
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

Modules, one concern each: ``config`` (:class:`TrainConfig`, :class:`DataConfig`), ``distributed``
(:class:`Distributed`), ``objective`` (role and timestep sampling, the flow-matching loss, the per-step generator),
``batches`` (the data sampler), ``checkpoints`` (``last.pt`` and the safetensors exports), ``trainer``
(:class:`Trainer`, :func:`train`, the learning-rate schedule and the ``max_minutes`` budget) and ``cli``
(``python -m jodi_core train``). Importing this package imports them all (torch, no model code).

Entry points: :func:`train` (a :class:`TrainConfig`) and :func:`main_train` (command-line arguments).
"""

from .batches import make_batches
from .checkpoints import CHECKPOINT_FORMAT, read_training_state, save_safetensors
from .cli import build_parser, main_train
from .config import TINY_DCAE, TINY_DIT, DataConfig, TrainConfig
from .distributed import Distributed
from .objective import CONDITION, GENERATE, IGNORE, TASKS, flow_matching_loss, sample_roles, sample_sigmas
from .trainer import Deadline, Trainer, TrainResult, lr_scale, train

__all__ = [
    "CHECKPOINT_FORMAT", "CONDITION", "GENERATE", "IGNORE", "TASKS", "TINY_DCAE", "TINY_DIT", "DataConfig", "Deadline",
    "Distributed", "TrainConfig", "TrainResult", "Trainer", "build_parser", "flow_matching_loss", "lr_scale",
    "main_train", "make_batches", "read_training_state", "sample_roles", "sample_sigmas", "save_safetensors", "train",
]
