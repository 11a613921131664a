"""What the JODI_ROLES and JODI_LATENT sockets carry between the nodes.

ComfyUI-free (the unit tests import it without a host). ``get_ram_usage`` is for hosts that weigh cached outputs by
size (ComfyUI's RAM-pressure cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ..jodi_core.domains import DOMAIN_NAMES, NUM_DOMAINS, Role, get_domain, parse_roles
from .layouts import image_to_bchw
from .vocabulary import check_number, resolve_role


@dataclass
class RolesPayload:
    """JODI_ROLES: one role name per domain and the condition IMAGEs (B, H, W, 3)."""

    roles: tuple[str, ...]
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.roles = tuple(Role.parse(r).name.lower() for r in self.roles)
        parse_roles([self.roles])  # 8 entries, at least one 'generate'
        for name in self.conditions:
            get_domain(name)
        for d, role in zip(DOMAIN_NAMES, self.roles):
            if role == "condition" and self.conditions.get(d) is None:
                raise ValueError(f"The {d} role is 'condition' but no {d} image was given.")

    @classmethod
    def from_choices(cls, choices: Mapping[str, Optional[str]], images: Mapping[str, Optional[torch.Tensor]]):
        roles = tuple(resolve_role(d, choices.get(d), images.get(d) is not None) for d in DOMAIN_NAMES)
        conditions = {d: images[d] for d, r in zip(DOMAIN_NAMES, roles) if r == "condition"}
        return cls(roles, conditions)

    def get_ram_usage(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conditions.values() if isinstance(t, torch.Tensor))

    def condition_tensors(self) -> dict[str, torch.Tensor]:
        """Condition images as ``(B, 3, H, W)`` in [0, 1], keyed by domain name."""
        return {d: image_to_bchw(img, f"the {d} condition image") for d, img in self.conditions.items()}

    def batch_size(self, requested: int) -> int:
        """Batch of a run: the requested size, or the condition batch when that is larger and the request is 1."""
        sizes = {img.shape[0] if img.dim() == 4 else 1 for img in self.conditions.values()}
        batch = max([requested, *sizes])
        bad = sorted(s for s in sizes if s not in (1, batch))
        if bad:
            raise ValueError(
                f"Condition images have batch sizes {sorted(sizes)}; each must be 1 or the run's batch size {batch}."
            )
        if requested not in (1, batch):
            raise ValueError(f"batch_size is {requested} but the condition images hold {batch} images.")
        return batch

    def first_condition_size(self) -> Optional[tuple[int, int]]:
        """(height, width) of the first connected condition image in domain order, if any."""
        for d in DOMAIN_NAMES:
            img = self.conditions.get(d)
            if img is not None:
                return int(img.shape[-3]), int(img.shape[-2])
        return None


@dataclass
class LatentPayload:
    """JODI_LATENT: scaled DC-AE latents of all 8 domains and which of them are present."""

    samples: torch.Tensor  # (B, 8, C, h, w) float32, scaled like the pipeline's output
    roles: torch.Tensor  # (B, 8) int64; IGNORE marks a domain that holds no content
    height: int  # output size in pixels the maps are decoded to
    width: int

    def __post_init__(self):
        samples = self.samples
        if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[1] != NUM_DOMAINS:
            shape = tuple(self.samples.shape) if isinstance(self.samples, torch.Tensor) else type(self.samples)
            raise ValueError(f"A Jodi latent must be shaped (B, {NUM_DOMAINS}, C, h, w), got {shape}.")
        self.roles = torch.as_tensor(self.roles, dtype=torch.long).reshape(-1, NUM_DOMAINS)
        if self.roles.shape[0] == 1 and self.samples.shape[0] > 1:
            self.roles = self.roles.repeat(self.samples.shape[0], 1)
        if self.roles.shape[0] != self.samples.shape[0]:
            raise ValueError(f"{self.roles.shape[0]} role rows for a latent batch of {self.samples.shape[0]}.")
        check_number("height", self.height, 1, 1 << 16, integer=True)
        check_number("width", self.width, 1, 1 << 16, integer=True)

    @property
    def batch(self) -> int:
        return self.samples.shape[0]

    def get_ram_usage(self) -> int:
        return self.samples.numel() * self.samples.element_size()

    def present(self) -> list[str]:
        """Domains with content in at least one sample (generated or given as a condition)."""
        return [d for i, d in enumerate(DOMAIN_NAMES) if (self.roles[:, i] != Role.IGNORE).any()]

    def select(self, domain: str) -> torch.Tensor:
        """One domain's latents ``(B, C, h, w)``."""
        i = get_domain(domain).index
        if not (self.roles[:, i] != Role.IGNORE).any():
            raise ValueError(f"This Jodi latent holds no {DOMAIN_NAMES[i]} (the domain was ignored in the run).")
        return self.samples[:, i]

    def replace(self, domain: str, latent: torch.Tensor) -> "LatentPayload":
        """A copy with one domain's latents replaced (broadcast over the batch); the domain is marked present."""
        i = get_domain(domain).index
        expected = tuple(self.samples.shape[2:])
        if latent.dim() == 3:
            latent = latent[None]
        if latent.dim() != 4 or tuple(latent.shape[1:]) != expected:
            raise ValueError(
                f"The {DOMAIN_NAMES[i]} latent is shaped {tuple(latent.shape)}; this Jodi latent needs (B, "
                f"{', '.join(map(str, expected))}). Latents from another model or size do not fit."
            )
        if latent.shape[0] not in (1, self.batch):
            raise ValueError(f"The {DOMAIN_NAMES[i]} latent has batch {latent.shape[0]}; need 1 or {self.batch}.")
        samples = self.samples.clone()
        samples[:, i] = latent.to(samples.dtype)
        roles = self.roles.clone()
        absent = roles[:, i] == Role.IGNORE
        roles[:, i] = torch.where(absent, torch.full_like(roles[:, i], Role.CONDITION), roles[:, i])
        return LatentPayload(samples, roles, self.height, self.width)
