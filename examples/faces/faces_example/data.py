"""The data: 200 real 25x25 grey photos from scikit-image (the first 100 faces, the last 100 non-faces).

trainrun orders and batches the samples itself; a dataset here only answers `dataset[i] -> (image, label)`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val")


def load_lfw_subset() -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [200, 1, 25, 25] in [0, 1], labels int64 [200]: 1 = face, 0 = not a face)."""
    from skimage.data import lfw_subset

    images = torch.from_numpy(lfw_subset()).float().unsqueeze(1)
    labels = torch.zeros(len(images), dtype=torch.int64)
    labels[:100] = 1  # scikit-image's documented order: 100 faces, then 100 non-faces
    return images, labels


def stratified_split(labels: torch.Tensor, val_fraction: float, split_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), each sorted: every class gives round(val_fraction * its count) samples to val,
    chosen by a generator seeded with `split_seed` alone, so the split does not move with the training seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.25")
    generator = torch.Generator().manual_seed(split_seed)
    train_parts, val_parts = [], []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = int(round(len(members) * val_fraction))
        if n_val == 0 or n_val == len(members):
            raise ValueError(f"val_fraction={val_fraction} leaves class {int(label)} ({len(members)} samples) with "
                             "an empty train or val part; choose a fraction between 0.01 and 0.99")
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


class LFWFaces(Dataset):
    """One split of the LFW subset, standardised with the training split's mean and standard deviation.

    The training split (with `flip`) mirrors an image left-right with probability 1/2. The coin is drawn from
    torch's global RNG: trainrun seeds it for every (seed, epoch, sample index), so a resumed run draws the same
    flips as an uninterrupted one.
    """

    def __init__(self, split: str = "train", val_fraction: float = 0.25, split_seed: int = 0, flip: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
        images, labels = load_lfw_subset()
        train_index, val_index = stratified_split(labels, val_fraction, split_seed)
        train_images = images[train_index]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std().clamp_min(1e-8))
        index = train_index if split == "train" else val_index
        self.indices = index  # positions in scikit-image's 200 photos
        self.images = ((images[index] - self.mean) / self.std).contiguous()
        self.labels = labels[index]
        self.split = split
        self.flip = flip and split == "train"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, int(self.labels[i])


def lfw_splits(val_fraction: float = 0.25, split_seed: int = 0, flip: bool = True) -> Dict[str, LFWFaces]:
    """The `data._target_` factory: {"train": ..., "val": ...} for trainrun."""
    return {split: LFWFaces(split, val_fraction, split_seed, flip) for split in SPLITS}
