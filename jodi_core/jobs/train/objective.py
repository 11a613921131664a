"""What the DiT stage learns from a batch: Jodi's training roles per sample (:func:`sample_roles`), the noise levels
(:func:`sample_sigmas`) and the flow-matching loss on the generated domains (:func:`flow_matching_loss`); and the
per-step generator they are drawn with (:func:`step_generator`), a pure function of the run and the step so that a
resumed run is exact."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...domains import NUM_DOMAINS, Role


GENERATE, CONDITION, IGNORE = int(Role.GENERATE), int(Role.CONDITION), int(Role.IGNORE)  # plain ints for torch.where
TASKS = ("joint", "controllable", "perception")


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


class TrainForward(nn.Module):
    """Wraps the transformer so that DDP sees one module whose forward returns the velocity for every domain."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, timestep, y, role, mask, clean_x):
        ctx = self.transformer.prepare(role, y, mask, prune=True)
        return self.transformer.forward_prepared(x, timestep, ctx, clean_x)


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """The noise/role generator of one step: a pure function of the run and the step, so resuming is exact."""
    salt = {"dcae": 1, "dit": 2}[stage]
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, salt, step, rank]).generate_state(1)[0]))
