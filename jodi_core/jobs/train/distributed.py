"""Distributed hooks: the one place that knows about ranks. :class:`Distributed` is a single process unless the run
was started by ``torchrun`` (``WORLD_SIZE`` > 1); then it sets up the process group, wraps models in DDP and averages
logged values over ranks."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.nn as nn


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
            gc.collect()  # as annotate: free the group before interpreter shutdown, where gloo's threads may abort
