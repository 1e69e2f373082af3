"""The train and eval transforms of the data section, from torchvision.transforms.v2 (docs/data.md, "Augmentation").

Image files (imagefolder, cifar10) get a `transform(img, sample_seed) -> float32 [3, H, W]`:
- train with data.augment=true: imagefolder RandomResizedCrop(data.train_crop_size or data.image_size,
  data.crop_scale, data.crop_ratio, data.interpolation), cifar10 RandomCrop(32, padding=4, reflect); then
  RandomHorizontalFlip, the policy (data.policy), ColorJitter (data.color_jitter), ToDtype(float32, scale=True) and
  Normalize(data.mean / data.std, default the dataset's constants), the order of torchvision's reference presets;
- eval (and train without augment): the image as floats, its short side resized to data.val_resize_size (default
  round(1.14 x crop)), centre-cropped to data.val_crop_size (default data.image_size), normalised.
In-memory tensor sets run `policy_chain(cfg)` after their crop and flip (datasets._tensor_augment).

torchvision's random transforms draw from torch's global CPU generator. `seeded_rng` runs them with that generator
seeded by the sample's seed and restores its state afterwards: a sample's augmentation is a pure function of its
seed (any worker count, any resume point), and the training's own random stream (dropout, MixUp) is untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment", "augmix")
AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
RANDAUGMENT_MAX_MAGNITUDE = 30  # RandAugment's num_magnitude_bins (31) - 1
AUGMIX_MAX_SEVERITY = 10
CIFAR_PAD = 4
EVAL_RESIZE_RATIO = 1.14  # the short side before the centre crop when data.val_resize_size is unset (224 -> 255)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block, its previous state restored after."""
    with torch.random.fork_rng(devices=[]):
        # torch.manual_seed would also reseed the CUDA generators the training draws dropout from
        torch.default_generator.manual_seed(seed)
        yield


def interpolation_mode(name: str):
    from torchvision.transforms.v2 import InterpolationMode

    return InterpolationMode[name.upper()]


def policy_transforms(cfg) -> List:
    """data.policy, then data.color_jitter, as v2 transforms (empty when neither is set)."""
    from torchvision.transforms import v2

    # the policies' rotate/shear/translate kernels take nearest or bilinear on tensors: bicubic stays with the crop
    mode = interpolation_mode("bilinear" if cfg.interpolation == "bicubic" else cfg.interpolation)
    chosen = []
    if cfg.policy == "autoaugment":
        chosen.append(v2.AutoAugment(v2.AutoAugmentPolicy(cfg.autoaugment_policy), interpolation=mode))
    elif cfg.policy == "randaugment":
        chosen.append(v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude,
                                     interpolation=mode))
    elif cfg.policy == "trivialaugment":
        chosen.append(v2.TrivialAugmentWide(interpolation=mode))
    elif cfg.policy == "augmix":
        chosen.append(v2.AugMix(severity=cfg.augmix_severity, interpolation=mode))
    if cfg.color_jitter > 0:
        j = float(cfg.color_jitter)
        chosen.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return chosen


def policy_chain(cfg):
    """The policy and colour jitter as one v2 transform, or None when data.policy=none and data.color_jitter=0."""
    from torchvision.transforms import v2

    chosen = policy_transforms(cfg)
    return v2.Compose(chosen) if chosen else None


def describe_policy(cfg) -> str:
    """What policy_chain applies, for the run's data line ('' when nothing)."""
    parts = []
    if cfg.policy == "autoaugment":
        parts.append(f"AutoAugment({cfg.autoaugment_policy})")
    elif cfg.policy == "randaugment":
        parts.append(f"RandAugment(num_ops={cfg.randaugment_num_ops}, magnitude={cfg.randaugment_magnitude})")
    elif cfg.policy == "trivialaugment":
        parts.append("TrivialAugmentWide")
    elif cfg.policy == "augmix":
        parts.append(f"AugMix(severity={cfg.augmix_severity})")
    if cfg.color_jitter > 0:
        parts.append(f"ColorJitter({cfg.color_jitter})")
    return " + ".join(parts)


def chain_seed(sample_seed: int) -> int:
    """The policy's seed where the sample's own seed already drove a generator (the in-memory crop): the same seed
    in both would make the policy's draws repeat the crop's."""
    return (sample_seed * 6364136223846793005 + 1442695040888963407) % (2**62)


class SeededTransform:
    """A v2 transform applied to an image file's decoded image (PIL or uint8 tensor) under `seeded_rng(seed)`;
    a class rather than a closure so that DataLoader workers started by spawn can receive it."""

    def __init__(self, chain, seeded: bool):
        self.chain, self.seeded = chain, seeded

    def __call__(self, img, sample_seed: int) -> torch.Tensor:
        if not self.seeded:
            return self.chain(img).as_subclass(torch.Tensor)
        with seeded_rng(sample_seed):
            return self.chain(img).as_subclass(torch.Tensor)


def image_train_transform(cfg, crop_size: int, mean: Sequence[float], std: Sequence[float],
                          pad_crop: bool) -> SeededTransform:
    """data.augment=true on image files. `pad_crop`: cifar10's padded random crop instead of RandomResizedCrop."""
    from torchvision.transforms import v2

    if pad_crop:
        crop = v2.RandomCrop(crop_size, padding=CIFAR_PAD, padding_mode="reflect")
    else:
        crop = v2.RandomResizedCrop(crop_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                    interpolation=interpolation_mode(cfg.interpolation), antialias=True)
    chain = v2.Compose([v2.ToImage(), crop, v2.RandomHorizontalFlip(), *policy_transforms(cfg),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return SeededTransform(chain, seeded=True)


class _EvalChain:
    """Floats first, then resize and crop: the eval pixels trainrun has always produced (data.val_resize_size unset,
    bilinear). `short_side` None: no resize or crop (cifar10's images are already the model's size)."""

    def __init__(self, crop_size: int, short_side: Optional[int], mean, std, interpolation: str):
        self.crop_size, self.short_side = crop_size, short_side
        self.mean, self.std, self.interpolation = list(mean), list(std), interpolation

    def __call__(self, img) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F

        t = F.to_dtype(F.to_image(img), torch.float32, scale=True)
        if self.short_side is not None:
            t = F.resize(t, self.short_side, interpolation=interpolation_mode(self.interpolation), antialias=True)
            t = F.center_crop(t, [self.crop_size, self.crop_size])
        return F.normalize(t, self.mean, self.std)


def image_eval_transform(crop_size: int, short_side: Optional[int], mean: Sequence[float], std: Sequence[float],
                         interpolation: str = "bilinear") -> SeededTransform:
    return SeededTransform(_EvalChain(crop_size, short_side, mean, std, interpolation), seeded=False)


def eval_short_side(cfg, crop_size: int) -> int:
    return int(cfg.val_resize_size) if cfg.get("val_resize_size") else int(round(crop_size * EVAL_RESIZE_RATIO))
