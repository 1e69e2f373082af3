"""The data: scikit-learn's diabetes set, 442 patients x 10 measurements, the target a disease progression score.

Features and target are standardised with the training split's statistics, so the model's outputs are in
standard deviations of the training target (val/mae too; val/r2 does not depend on the scale).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch.utils.data import TensorDataset


def load_diabetes_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [442, 10], target float32 [442, 1]): one target value per sample, kept as a vector of
    one so the model's output [N, 1] and the target [N, 1] have the same shape."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return torch.as_tensor(bunch.data, dtype=torch.float32), torch.as_tensor(bunch.target, dtype=torch.float32)[:, None]


def random_split(n: int, val_fraction: float, split_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), each sorted, from a permutation seeded with `split_seed` alone."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.2")
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty train or val split of {n} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def standardise(train: torch.Tensor, other: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both tensors shifted and scaled per column by the mean and standard deviation of `train`."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return (train - mean) / std, (other - mean) / std


def diabetes_splits(val_fraction: float = 0.2, split_seed: int = 0) -> Dict[str, TensorDataset]:
    """The `data._target_` factory: {"train": ..., "val": ...}; sample i is (features [10], target [1])."""
    features, target = load_diabetes_tensors()
    train_index, val_index = random_split(len(target), val_fraction, split_seed)
    train_x, val_x = standardise(features[train_index], features[val_index])
    train_y, val_y = standardise(target[train_index], target[val_index])
    return {"train": TensorDataset(train_x.contiguous(), train_y.contiguous()),
            "val": TensorDataset(val_x.contiguous(), val_y.contiguous())}
