"""Repeated augmentation (data.ra_reps), the sampler of torchvision's classification references and DeiT.

With k = data.ra_reps > 1 an epoch is the shuffled order with every index repeated k times in a row, cut to the
length of a plain epoch: it holds about n / k distinct samples, each k times, and each copy gets its own
augmentation (its seed depends on the copy number, `repetition_seed`). Across ranks the positions are dealt out
round-robin (rank r takes positions r, r + world, ...), so the k copies of a sample land on k different ranks,
as torchvision's RASampler does with `indices[rank:total_size:num_replicas]`.

Differences from torchvision's RASampler, on purpose:
- the permutation comes from `data_order_generator(seed, epoch)` (the plain epoch's own), so the first copy of each
  sample is where a plain epoch would start;
- each rank keeps the plain epoch's share (n / world samples, whole batches) instead of `n // 256 * 256 / world`:
  an epoch has the plain epoch's number of steps, so the schedule, the checkpoints and resume are unchanged;
- the padding of the repeated list to a multiple of the world size never matters: an epoch keeps n of its n * k
  positions.
Everything is a pure function of (seed, epoch), so a run resumes mid-epoch exactly.
"""
from __future__ import annotations

from typing import Tuple

import torch

from trainrun.seed import data_order_generator

_COPY_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit golden-ratio constant: copies' seeds land far from other samples'


def repeated_order(n: int, reps: int, seed: int, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sample index, copy number) at each of n * reps positions: randperm(n) of (seed, epoch) with each index
    repeated `reps` times in a row (torchvision's list before the rank split and the selection)."""
    perm = torch.randperm(n, generator=data_order_generator(seed, epoch))
    return perm.repeat_interleave(reps), torch.arange(n * reps) % reps


def ra_order(n: int, reps: int, seed: int, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The epoch's n global positions: `repeated_order` cut to the length of a plain epoch."""
    indices, copies = repeated_order(n, reps, seed, epoch)
    return indices[:n], copies[:n]


def rank_positions(batch: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The global positions rank `rank` reads in batch `batch`: global batch b spans positions [b * B, (b + 1) * B)
    with B = batch_size * world, dealt round-robin over the ranks (torchvision: indices[rank::num_replicas])."""
    start = batch * batch_size * world + rank
    return torch.arange(start, start + batch_size * world, world)


def repetition_seed(base_seed: int, copy: int) -> int:
    """The augmentation seed of copy `copy` of a sample whose plain seed is `base_seed` (copy 0 keeps it)."""
    return (base_seed + copy * _COPY_STRIDE) % (2**62)
