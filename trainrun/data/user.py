"""The user's own data (`data._target_`): a factory returning map-style datasets (or tensors) for train/val and,
optionally, a held-out "test" split (only mode=test reads it) and "class_names" (one string per class index; else
the train dataset's own `classes`, as torchvision datasets name them).

trainrun keeps the batching and the order (trainrun.data.loader), so a resumed run replays exactly: a sample's
randomness (a user transform drawing from torch's global RNG) is seeded from (seed, epoch, sample index), as
trainrun's own image files are, whatever the worker count or resume point.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Tuple

import torch

from trainrun.data.datasets import Split, TensorSet, check_class_names, complete_class_names, limit
from trainrun.errors import DataError


class UserSet:
    """A user's map-style dataset as trainrun's loader reads it: `load(i, sample_seed) -> (x, y)`."""

    def __init__(self, dataset, name: str, indices: Optional[range] = None):
        self.dataset, self.name = dataset, name
        self.indices = indices if indices is not None else range(len(dataset))
        self._y: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int, sample_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream (dropout, MixUp, ...) is untouched
            torch.manual_seed(sample_seed)
            try:
                x, y = self.dataset[self.indices[i]]
            except Exception as e:  # noqa: BLE001  (user code)
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise DataError(f"data._target_: {self.name} sample {self.indices[i]} failed to load "
                                f"({type(e).__name__}: {text}); checkpoints written so far are intact") from e
        return torch.as_tensor(x), _target_tensor(y)

    @property
    def y(self) -> torch.Tensor:
        """Every target in index order: the dataset's own `targets` if it has them, else read once sample by
        sample (that loads every sample once; give the dataset a `targets` attribute to avoid it)."""
        if self._y is None:
            own = getattr(self.dataset, "targets", None)
            if own is not None and len(own) == len(self.dataset):
                self._y = torch.stack([_target_tensor(own[j]) for j in self.indices])
            else:
                self._y = torch.stack([self.load(i, 0)[1] for i in range(len(self))])
        return self._y

    def subset(self, n: int) -> "UserSet":
        return UserSet(self.dataset, self.name, self.indices[:n])


def _target_tensor(y: Any) -> torch.Tensor:
    t = torch.as_tensor(y)
    return t.float() if t.is_floating_point() else t  # float64 targets (numpy) train in fp32


def _as_part(part, name: str):
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part):
        x, y = part
        return TensorSet(x.float(), _target_tensor(y))
    return UserSet(part, name)


def _fingerprint(target: str, kwargs: dict, parts: dict) -> str:
    """What the data is, as cheaply as it can be told: the factory, its arguments, the split sizes, and the first
    and last sample of each split (a changed file or a changed split moves it)."""
    h = hashlib.sha256(json.dumps([target, kwargs], sort_keys=True, default=str).encode())
    for name, ds in parts.items():
        h.update(f"{name}:{len(ds)}".encode())
        for i in {0, len(ds) - 1}:
            for t in (ds.x[i], ds.y[i]) if isinstance(ds, TensorSet) else ds.load(i, 0):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_user_split(cfg, classifies: bool) -> Split:
    """Call data._target_ and wrap what it returns; `classifies`: the task needs class indices (num_classes)."""
    from trainrun import usercode
    from trainrun.config import DataConfig

    schema = usercode.schema_defaults(DataConfig)
    result = usercode.call_factory(cfg, "data._target_", schema, {"split_seed": cfg.split_seed})
    names = result.get("class_names") if isinstance(result, dict) else None
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "class_names"}
    datasets = usercode.as_datasets(result, target=cfg._target_)
    parts = {name: _as_part(ds, name) for name, ds in datasets.items()}
    parts["train"], parts["val"] = limit(parts["train"], cfg.limit_train), limit(parts["val"], cfg.limit_val)
    x0 = parts["train"].x[0] if isinstance(parts["train"], TensorSet) else parts["train"].load(0, 0)[0]
    num_classes = None
    if classifies:
        num_classes = cfg.num_classes or int(max(int(p.y.max()) for p in parts.values())) + 1
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in schema}
    sizes = ", ".join(f"{len(ds)} {name}" for name, ds in parts.items())
    split = Split(parts["train"], parts["val"], num_classes, tuple(x0.shape),
                  _fingerprint(cfg._target_, kwargs, parts), f"{cfg._target_}: {sizes} samples of {list(x0.shape)}",
                  test=parts.get("test"))
    if num_classes is not None:
        split.class_names = complete_class_names(_class_names(cfg._target_, names, datasets["train"], num_classes),
                                                 num_classes)
    return split


def _class_names(target: str, given: Any, train, num_classes: int) -> Optional[list]:
    """The factory's "class_names" (checked: a bad value is refused in one line), else the train dataset's own
    `classes` when it is one string per class (torchvision's convention; anything else there is not ours to judge)."""
    if given is not None:
        return check_class_names(f"data._target_={target}", given, num_classes)
    own = getattr(train, "classes", None)
    fits = isinstance(own, (list, tuple)) and len(own) >= num_classes and all(isinstance(n, str) for n in own)
    return list(own) if fits and len(set(own)) == len(own) else None
