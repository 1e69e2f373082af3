"""Deterministic, resumable batching.

Epoch e visits the training set in the order `randperm(n, seed(seed, e))`, so the data order
is a pure function of (seed, epoch) and a run can restart at any batch of any epoch.
Image-file augmentations draw from a generator seeded by (seed, epoch, sample index), so the
same sample gets the same augmentation whatever the worker count or resume point.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from trainrun.data.datasets import FileSet, TensorSet
from trainrun.seed import data_order_generator


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**62)


class _FileBatches(torch.utils.data.Dataset):
    def __init__(self, ds: FileSet):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Tuple[int, int]):
        index, s = key
        return self.ds.load(index, s)


class BatchStream:
    def __init__(self, ds, batch_size: int, seed: int, *, shuffle: bool, drop_last: bool,
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1):
        """With world > 1 every batch of the epoch is a global batch of batch_size * world samples, of which
        rank r takes the r-th slice: N ranks see exactly what one process with N times the batch would."""
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.rank, self.world = rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.order_fn: Optional[Callable[[int], torch.Tensor]] = None  # a curriculum's epoch order, if any
        n, global_batch = len(ds), batch_size * world
        self.batches_per_epoch = n // global_batch if drop_last else -(-n // global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        if self.order_fn is not None:
            return self.order_fn(epoch)
        n = len(self.ds)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=data_order_generator(self.seed, epoch))

    def batch_indices(self, epoch: int, start: int = 0) -> List[torch.Tensor]:
        order = self.order(epoch)
        g, lo = self.batch_size * self.world, self.rank * self.batch_size
        return [order[b * g + lo:b * g + lo + self.batch_size] for b in range(start, self.batches_per_epoch)]

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, sample indices) for batches start.. of `epoch`."""
        batches = self.batch_indices(epoch, start)
        if isinstance(self.ds, TensorSet):
            for idx in batches:
                yield self.ds.x[idx], self.ds.y[idx], idx
            return
        keyed = [[(int(i), sample_seed(self.seed, epoch, int(i))) for i in idx] for idx in batches]
        loader = DataLoader(_FileBatches(self.ds), batch_sampler=keyed, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        for idx, (x, y) in zip(batches, loader):
            yield x, y, idx
