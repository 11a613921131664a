"""The data sampler: batch ``b`` of a run is a pure function of (seed, b, rank), drawn from the synthetic world or a
Joint-1.6M layout folder (:func:`make_batches`), so that a resumed run sees the batches it would have seen."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import numpy as np
import torch

from .config import TrainConfig
from .distributed import Distributed


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
    per-epoch permutation, as ``(index, epoch)`` (the epoch varies the caption drawn); plain positions for the
    endless synthetic world."""

    def __init__(self, n: Optional[int], batch: int, start: int, seed: int, dist: Distributed, fixed: bool):
        self.n, self.batch, self.start, self.seed, self.dist, self.fixed = n, batch, start, seed, dist, fixed
        self._perm: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> "int | tuple[int, int]":
        if self.n is None:
            return position
        epoch, i = divmod(position, self.n)
        perm = self._perm.get(epoch)
        if perm is None:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            perm = self._perm[epoch]
        return int(perm[i]), epoch

    def __iter__(self) -> Iterator["int | tuple[int, int]"]:
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
        dataset = JointDataset(cfg.data.root, cfg.data.size, domains=cfg.data.domains, seed=cfg.seed,
                               caption_key=cfg.caption_key)
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
