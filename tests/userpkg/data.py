"""Data factories over scikit-learn's real digits and diabetes sets, for the binary, multilabel and regression
tasks (tests run them through the CLI with data._target_=userpkg.data.NAME)."""
import torch
from torch.utils.data import Dataset


def _digits(split_seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    return x[perm], y[perm]


def digits_binary(val_fraction: float = 0.2, split_seed: int = 0):
    """Is the digit 5 or larger? (x, y) tensor pairs."""
    x, y = _digits(split_seed)
    n_val = int(len(y) * val_fraction)
    t = (y >= 5).long()
    return {"train": (x[n_val:], t[n_val:]), "val": (x[:n_val], t[:n_val])}


class DigitAttributes(Dataset):
    """Three yes/no attributes per digit image: even, >= 5, drawn with a closed loop (0, 6, 8, 9)."""

    def __init__(self, x, y, flip: bool = False):
        self.x, self.flip = x, flip
        self.targets = torch.stack([(y % 2 == 0), (y >= 5), torch.isin(y, torch.tensor([0, 6, 8, 9]))], 1).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.flip and torch.rand(()) < 0.5:  # drawn from torch's global RNG: trainrun seeds it per sample
            x = x + 0.01 * torch.randn_like(x)
        return x, self.targets[i]


def digits_multilabel(val_fraction: float = 0.2, noise: bool = True):
    x, y = _digits()
    n_val = int(len(y) * val_fraction)
    return {"train": DigitAttributes(x[n_val:], y[n_val:], flip=noise), "val": DigitAttributes(x[:n_val], y[:n_val])}


def diabetes(val_fraction: float = 0.2, split_seed: int = 0):
    """load_diabetes: 442 patients x 10 features -> disease progression (standardised with train statistics)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    x, y = x[perm], y[perm]
    n_val = int(len(y) * val_fraction)
    xm, xs = x[n_val:].mean(0), x[n_val:].std(0)
    ym, ys = y[n_val:].mean(), y[n_val:].std()
    x, y = (x - xm) / xs, (y - ym) / ys
    return {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}


def not_a_dataset():
    return {"train": 3, "val": 4}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(100):
            yield torch.zeros(1, 8, 8), i % 10


def iterable():
    return {"train": Stream(), "val": Stream()}
