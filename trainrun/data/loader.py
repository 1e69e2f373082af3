"""Deterministic, resumable batching.

Epoch e visits the training set in the order `randperm(n, seed(seed, e))`, so the data order
is a pure function of (seed, epoch) and a run can restart at any batch of any epoch.
Augmentations (image files, and in-memory tensor sets with data.augment) draw from randomness seeded
by (seed, epoch, sample index), so the same sample gets the same augmentation whatever the worker count
or resume point. With repeated augmentation (data.ra_reps = k > 1, trainrun/data/sampler.py) the epoch
repeats each sample k times and the seed also depends on the copy, so every copy is augmented differently.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from trainrun.data.datasets import FileSet, TensorSet
from trainrun.data.sampler import ra_order, rank_positions, repetition_seed
from trainrun.errors import ConfigError, DataError
from trainrun.seed import data_order_generator


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**62)


def _private_generator() -> torch.Generator:
    """Every DataLoader iterator draws a base seed for its workers from its generator, by default the global
    torch RNG, even with no workers: that would make the RNG stream (dropout, MixUp, ...) depend on how many
    iterators were started, so a resumed run or another worker count would drift. Sample randomness comes from
    the per-sample seeds instead, so the loaders get a private generator."""
    return torch.Generator().manual_seed(0)


class _EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a persistent DataLoader: yields the keyed batches of the epoch being iterated.

    Batches are drawn in the main process, so the workers kept alive across epochs still receive exactly the
    (index, sample seed) keys of the current epoch."""

    def __init__(self):
        self.batches: List[List[Tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1,
                 persistent_workers: bool = False, prefetch_factor: Optional[int] = None,
                 ra_reps: Optional[int] = None):
        """With world > 1 every batch of the epoch is a global batch of batch_size * world samples, of which
        rank r takes the r-th slice: N ranks see exactly what one process with N times the batch would.

        Image-file datasets load through a torch DataLoader with `num_workers` processes. By default its workers
        start anew every epoch; `persistent_workers=True` keeps them (and their imports and file handles) alive
        across epochs, `prefetch_factor` sets the batches each worker loads ahead (torch's default: 2). Neither
        changes a batch: samples and their augmentation seeds are chosen in the main process.

        `ra_reps`: repeated augmentation (trainrun/data/sampler.py) on a shuffled stream; None takes the dataset's
        own `ra_reps` (the training split of data.ra_reps carries it), 1 is the plain epoch."""
        self.ds, self.batch_size, self.seed = ds, batch_size, seed
        self.rank, self.world = rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = bool(persistent_workers and num_workers > 0)
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self._loader: Optional[DataLoader] = None  # the persistent DataLoader, built on first use
        self._sampler: Optional[_EpochBatches] = None
        self._order_fn: Optional[Callable[[int], torch.Tensor]] = None  # a curriculum's epoch order, if any
        self.ra_reps = int(ra_reps if ra_reps is not None else getattr(ds, "ra_reps", 1)) if shuffle else 1
        n, global_batch = len(ds), batch_size * world
        self.batches_per_epoch = n // global_batch if drop_last else -(-n // global_batch)

    @property
    def order_fn(self) -> Optional[Callable[[int], torch.Tensor]]:
        return self._order_fn

    @order_fn.setter
    def order_fn(self, fn: Optional[Callable[[int], torch.Tensor]]) -> None:
        if fn is not None and self.ra_reps > 1:
            raise ConfigError(f"data.ra_reps={self.ra_reps} with a curriculum: the curriculum chooses and orders "
                              "each epoch's samples itself, repeated augmentation repeats a shuffled order; use one "
                              "of them (data.ra_reps=1 or curriculum.name=off)")
        self._order_fn = fn

    def order(self, epoch: int) -> torch.Tensor:
        if self.order_fn is not None:
            return self.order_fn(epoch)
        n = len(self.ds)
        if not self.shuffle:
            return torch.arange(n)
        if self.ra_reps > 1:
            return ra_order(n, self.ra_reps, self.seed, epoch)[0]
        return torch.randperm(n, generator=data_order_generator(self.seed, epoch))

    def batch_indices(self, epoch: int, start: int = 0) -> List[torch.Tensor]:
        return [idx for idx, _ in self.batch_keys(epoch, start, seeds=False)]

    def batch_keys(self, epoch: int, start: int = 0,
                   seeds: bool = True) -> List[Tuple[torch.Tensor, Optional[List[int]]]]:
        """(sample indices, their augmentation seeds or None where not `seeds`) of this rank's batches start.. of
        `epoch`. A plain epoch gives rank r the r-th contiguous slice of each global batch; repeated augmentation
        deals the global batch round-robin (torchvision's RASampler) and seeds each copy of a sample differently."""
        n, batches = len(self.ds), range(start, self.batches_per_epoch)
        if self.ra_reps > 1:
            order, copies = ra_order(n, self.ra_reps, self.seed, epoch)
            keys = []
            for b in batches:
                pos = rank_positions(b, self.batch_size, self.rank, self.world)
                pos = pos[pos < n]  # the last, partial batch of a stream that keeps it (drop_last=False)
                idx = order[pos]
                keys.append((idx, [repetition_seed(sample_seed(self.seed, epoch, int(i)), int(c))
                                   for i, c in zip(idx, copies[pos])] if seeds else None))
            return keys
        order = self.order(epoch)
        g, lo = self.batch_size * self.world, self.rank * self.batch_size
        slices = [order[b * g + lo:b * g + lo + self.batch_size] for b in batches]
        return [(idx, [sample_seed(self.seed, epoch, int(i)) for i in idx] if seeds else None) for idx in slices]

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, sample indices) for batches start.. of `epoch`."""
        if isinstance(self.ds, TensorSet):
            augment = self.ds.augment
            for idx, seeds in self.batch_keys(epoch, start, seeds=augment is not None):
                x = self.ds.x[idx]
                yield (augment(x, seeds) if augment is not None else x), self.ds.y[idx], idx
            return
        batch_keys = self.batch_keys(epoch, start)
        batches = [idx for idx, _ in batch_keys]
        keyed = [[(int(i), s) for i, s in zip(idx, seeds)] for idx, seeds in batch_keys]
        if self.persistent_workers:
            if self._loader is None:
                self._sampler = _EpochBatches()
                self._loader = DataLoader(_FileBatches(self.ds), batch_sampler=self._sampler,
                                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                                          persistent_workers=True, prefetch_factor=self.prefetch_factor,
                                          generator=_private_generator())
            self._sampler.batches = keyed  # read when the loader's iterator starts this epoch
            loader = self._loader
        else:
            loader = DataLoader(_FileBatches(self.ds), batch_sampler=keyed, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                                generator=_private_generator())
        try:
            for idx, (x, y) in zip(batches, loader):
                yield x, y, idx
        except DataError as e:  # from a worker, the message carries the worker's traceback: keep its last line
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
