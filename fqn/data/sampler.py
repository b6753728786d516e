"""A training loader that shards by rank itself and resumes mid-epoch at the exact next batch.

Lightning restores a loader's position only when the loader implements
``state_dict``/``load_state_dict``; then a run killed mid-epoch and resumed from
its last checkpoint sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ShardedShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks (padded to equal length), optionally skipping a prefix.

    Example:
        >>> ranks = [list(ShardedShuffleSampler(5, seed=0, rank=r, world_size=2)) for r in (0, 1)]
        >>> [len(r) for r in ranks], sorted(set(ranks[0] + ranks[1]))  # 5 indices padded to 2 x 3
        ([3, 3], [0, 1, 2, 3, 4])
        >>> s = ShardedShuffleSampler(5, seed=0)
        >>> full = list(s)
        >>> s.skip = 2  # resuming after two samples of this epoch
        >>> list(s) == full[2:]
        True
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.length = length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # indices of this rank to skip once, on the next iteration (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def per_rank(self) -> int:
        return -(-self.length // self.world_size)

    def __len__(self) -> int:
        return self.per_rank()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        order += order[: self.per_rank() * self.world_size - self.length]  # pad so every rank has as many
        mine = order[self.rank::self.world_size]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches consumed) is saved in and restored from checkpoints.

    Lightning prefetches a batch ahead, so the loader cannot count what the loop consumed; the
    training module sets ``batches_done`` at the start of each batch instead.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ShardedShuffleSampler, **kw: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kw)
        self.batches_done = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        sampler: ShardedShuffleSampler = self.sampler
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(sampler.epoch)
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            sampler.skip = self._resume["batches"] * self.batch_size
            self.batches_done = self._resume["batches"]
        else:
            self.batches_done = 0
        self._resume = None
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
