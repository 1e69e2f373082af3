"""Augmentation policies (trainrun/data/transforms.py): each transform against torchvision.transforms.v2 applied
directly with the same seed, the eval resize + centre crop, interpolation, normalisation constants, the in-memory
sets' float path, and the refusals of the data section's augmentation keys."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from conftest import structured

from trainrun.config import DataConfig
from trainrun.data import BatchStream, build_split
from trainrun.data.datasets import _image_transforms, check
from trainrun.data.loader import sample_seed
from trainrun.data.transforms import chain_seed
from trainrun.errors import ConfigError

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def data_cfg(**kw):
    return structured(DataConfig, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of smooth 40x30 RGB images (smooth, so resampling differences show), a train/ and val/ folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("augment") / "imgs"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:30, 0:40]
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                f = rng.uniform(0.05, 0.3, size=3)
                arr = np.stack([127 + 120 * np.sin(f[c] * xx + (c + 1) * f[c] * yy) for c in range(3)], -1)
                Image.fromarray(arr.astype(np.uint8), "RGB").save(root / split / cls / f"{i}.png")
    return root


def _policy(name: str, mode=InterpolationMode.BILINEAR):
    return {"none": [], "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, interpolation=mode)],
            "randaugment": [v2.RandAugment(num_ops=3, magnitude=12, interpolation=mode)],
            "trivialaugment": [v2.TrivialAugmentWide(interpolation=mode)],
            "augmix": [v2.AugMix(severity=5, interpolation=mode)]}[name]


POLICY_KEYS = {"autoaugment": {"autoaugment_policy": "cifar10"},
               "randaugment": {"randaugment_num_ops": 3, "randaugment_magnitude": 12},
               "augmix": {"augmix_severity": 5}}


@pytest.mark.parametrize("policy,interpolation", [("none", "bilinear"), ("autoaugment", "bilinear"),
                                                  ("randaugment", "nearest"), ("trivialaugment", "bicubic"),
                                                  ("augmix", "bilinear")])
def test_image_file_train_transform_is_torchvision_v2(folder, policy, interpolation):
    cfg = data_cfg(name="imagefolder", root=str(folder), image_size=16, augment=True, policy=policy,
                   interpolation=interpolation, crop_scale=[0.08, 1.0], crop_ratio=[0.5, 2.0], train_crop_size=12,
                   color_jitter=0.3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], **POLICY_KEYS.get(policy, {}))
    split = build_split(cfg)
    mode = InterpolationMode[interpolation.upper()]
    # torchvision's affine kernels take no bicubic on tensors: the policy then rotates and shears bilinearly
    policy_mode = InterpolationMode.BILINEAR if interpolation == "bicubic" else mode
    reference = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(12, scale=(0.08, 1.0), ratio=(0.5, 2.0),
                                                               interpolation=mode, antialias=True),
                            v2.RandomHorizontalFlip(), *_policy(policy, policy_mode), v2.ColorJitter(0.3, 0.3, 0.3),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])
    assert split.input_shape == (3, 16, 16)  # the eval size: what trainrun.load and export feed the model
    for i, seed in ((0, 11), (3, 12345), (5, sample_seed(0, 2, 5))):
        torch.manual_seed(99)
        before = torch.get_rng_state()
        x, _ = split.train.load(i, seed)
        assert torch.equal(torch.get_rng_state(), before)  # the training's random stream is untouched
        torch.manual_seed(seed)
        expected = reference(split.train.base[split.train.indices[i]][0])
        assert type(x) is torch.Tensor and torch.equal(x, expected)
    assert not torch.equal(split.train.load(0, 1)[0], split.train.load(0, 2)[0])


def test_cifar_style_pad_crop_is_torchvision_random_crop():
    tf = _image_transforms(data_cfg(name="cifar10", augment=True, policy="trivialaugment"), [0.4, 0.5, 0.6],
                           [0.2, 0.2, 0.3], cifar=True)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    reference = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                            v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.4, 0.5, 0.6], [0.2, 0.2, 0.3])])
    for seed in (0, 7, 2**40 + 3):
        torch.manual_seed(seed)
        assert torch.equal(tf.train(img, seed), reference(img))
    assert tf.train_size == tf.eval_size == 32 and tf.short_side is None


def test_eval_resize_and_centre_crop_is_torchvision(folder):
    cfg = data_cfg(name="imagefolder", root=str(folder), image_size=16, val_resize_size=20, val_crop_size=14,
                   interpolation="bicubic", mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1])
    split = build_split(cfg)
    img = split.val.base[split.val.indices[0]][0]
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Resize(20, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(14), v2.Normalize([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])])
    x, _ = split.val.load(0, 5)
    assert x.shape == (3, 14, 14) and torch.equal(x, reference(img))
    assert split.preprocess == {"image_size": 14, "short_side": 20, "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1],
                                "interpolation": "bicubic"}
    # without data.augment the training split is evaluated the same way, whatever the seed
    assert torch.equal(split.train.load(0, 1)[0], split.train.load(0, 2)[0])
    # bilinear gives other pixels: the interpolation key reaches the resize
    bilinear = build_split(data_cfg(name="imagefolder", root=str(folder), image_size=16, val_resize_size=20,
                                    val_crop_size=14, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1]))
    assert not torch.equal(bilinear.val.load(0, 5)[0], x) and "interpolation" not in bilinear.preprocess


def test_default_eval_is_todays_pixels(folder):
    """data.val_resize_size unset: floats, short side round(1.14 x size) bilinear antialiased, centre crop - the
    formula trainrun has always used (written out here, not through transforms.py)."""
    import torchvision.transforms.v2.functional as F

    split = build_split(data_cfg(name="imagefolder", root=str(folder), image_size=16))
    img = split.val.base[split.val.indices[1]][0]
    t = F.to_dtype(F.to_image(img), torch.float32, scale=True)
    old = F.normalize(F.center_crop(F.resize(t, 18, antialias=True), [16, 16]), *IMAGENET)
    assert torch.equal(split.val.load(1, 0)[0], old)
    assert split.preprocess["short_side"] == 18 and split.input_shape == (3, 16, 16)


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment", "augmix"])
def test_in_memory_policy_is_v2_on_the_unit_scale(policy):
    """Digits: today's crop (pinned by test_hardening_inputs), then the v2 policy run directly on the image at its
    [0, 1] scale with the sample's chain seed, standardised again."""
    plain = build_split(data_cfg(augment=True))
    split = build_split(data_cfg(augment=True, policy=policy, color_jitter=0.2, **POLICY_KEYS.get(policy, {})))
    idx, seeds = torch.tensor([4, 9, 100]), [sample_seed(3, 1, i) for i in (4, 9, 100)]
    cropped = plain.train.augment(plain.train.x[idx], seeds)
    mean, std = split.preprocess["mean"], split.preprocess["std"]
    reference = v2.Compose([*_policy(policy), v2.ColorJitter(0.2, 0.2, 0.2)])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    out = split.train.augment(split.train.x[idx], seeds)
    assert torch.equal(torch.get_rng_state(), before)
    for k, s in enumerate(seeds):
        torch.manual_seed(chain_seed(s))
        assert torch.equal(out[k], (reference(cropped[k] * std + mean) - mean) / std)
    assert policy in split.description.lower().replace("trivialaugmentwide", "trivialaugment")


def test_v2_policy_ops_accept_float_images():
    """The float path in-memory sets take: every op of TrivialAugmentWide's and RandAugment's spaces, at its
    strongest magnitude and both signs, gives on a float image in [0, 1] what it gives on the uint8 image up to the
    uint8 path's rounding."""
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    checked = 0
    for policy in (v2.TrivialAugmentWide(), v2.RandAugment()):
        for op, (magnitudes_fn, signed) in policy._AUGMENTATION_SPACE.items():  # torchvision's own op table
            magnitudes = magnitudes_fn(policy.num_magnitude_bins, 16, 16)
            strongest = float(magnitudes[-1]) if magnitudes is not None and magnitudes.ndim else 0.0
            for magnitude in ((strongest, -strongest) if signed else (strongest,)):
                args = (op, magnitude, InterpolationMode.BILINEAR, {})
                from_uint8 = policy._apply_image_or_video_transform(u, *args).float() / 255
                from_float = policy._apply_image_or_video_transform(u.float() / 255, *args)
                assert from_float.dtype == torch.float32, op
                # uint8 rounds (grey levels: floors) before a blend by up to 1.99: at most 2 levels apart
                assert float((from_float - from_uint8).abs().max()) <= 2 / 255 + 1e-6, (op, magnitude)
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment", "augmix"])
def test_v2_policies_run_on_float_images(policy):
    """Whole policies on floats: the same ops are drawn as on uint8 (most pixels agree to rounding; a rounded pixel
    can cross a solarize or posterize threshold), and the output stays a float image in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    t = _policy(policy)[0]
    for seed in range(8):
        torch.manual_seed(seed)
        from_uint8 = t(u).float() / 255
        torch.manual_seed(seed)
        from_float = t(u.float() / 255)
        assert from_float.dtype == torch.float32 and 0 <= float(from_float.min()) and float(from_float.max()) <= 1
        assert float((from_float - from_uint8).abs().median()) <= 1.5 / 255, seed


def test_policy_refuses_tensors_outside_the_unit_range(tmp_path):
    from trainrun.errors import DataError

    x = torch.rand(40, 3, 8, 8) * 4
    torch.save({"x": x, "y": torch.arange(40) % 2}, tmp_path / "t.pt")
    with pytest.raises(DataError, match=r"data.policy=augmix: tensors\(t.pt\) holds values in \[.*\]; .*\[0, 1\]"):
        build_split(data_cfg(name="tensors", root=str(tmp_path / "t.pt"), augment=True, policy="augmix"))
    torch.save({"x": x / 4, "y": torch.arange(40) % 2}, tmp_path / "t.pt")
    split = build_split(data_cfg(name="tensors", root=str(tmp_path / "t.pt"), augment=True, policy="augmix"))
    assert "AugMix(severity=3)" in split.description and "horizontal flip" in split.description


@pytest.mark.parametrize("keys,message", [
    ({"policy": "randaugment"}, "data.policy='randaugment': it belongs to the training augmentation; set "
                                "data.augment=true"),
    ({"ra_reps": 3}, "data.ra_reps=3: each of the k copies would be the same image"),
    ({"augment": True, "policy": "autoaugmix"}, "data.policy='autoaugmix': must be one of none, autoaugment"),
    ({"augment": True, "autoaugment_policy": "mnist"}, "data.autoaugment_policy='mnist': must be one of imagenet"),
    ({"augment": True, "interpolation": "lanczos"}, "data.interpolation='lanczos': must be one of bilinear"),
    ({"augment": True, "randaugment_magnitude": 31}, "data.randaugment_magnitude=31: RandAugment's magnitude"),
    ({"augment": True, "augmix_severity": 0}, "data.augmix_severity=0: must be > 0"),
    ({"augment": True, "color_jitter": -0.1}, "data.color_jitter=-0.1: must be >= 0"),
    ({"augment": True, "ra_reps": 0}, "data.ra_reps=0: must be > 0"),
    ({"name": "imagefolder", "augment": True, "crop_scale": [0.5, 0.1]}, "data.crop_scale=[0.5, 0.1]: give [low"),
    ({"name": "imagefolder", "augment": True, "crop_ratio": [0, 1]}, "data.crop_ratio=[0.0, 1.0]: give [low"),
    ({"name": "imagefolder", "mean": [0.5]}, "data.mean=[0.5]: give 3 values"),
    ({"name": "imagefolder", "std": [0.5, 0.5, 0]}, "data.std=[0.5, 0.5, 0.0]: give 3 values, one per RGB channel, "
                                                    "each > 0"),
    ({"name": "imagefolder", "val_resize_size": 30}, "data.val_resize_size=30: the eval centre crop (32) is larger"),
    ({"name": "cifar10", "augment": True, "train_crop_size": 24}, "data.train_crop_size=24: data=cifar10 trains"),
    ({"augment": True, "crop_scale": [0.08, 1.0]}, "data.crop_scale=[0.08, 1.0]: applies to image files"),
    ({"mean": [0.1, 0.1, 0.1]}, "data.mean=[0.1, 0.1, 0.1]: applies to image files"),
    ({"crop_scale": [0.08, 1.0]}, "data.crop_scale=[0.08, 1.0]: applies to image files"),  # not "set augment" first
    ({"_target_": "mypkg.data.splits", "ra_reps": 2}, "data.ra_reps=2: with data._target_ your dataset prepares"),
])
def test_augmentation_keys_are_checked(keys, message):
    with pytest.raises(ConfigError) as e:
        check(data_cfg(**keys))
    assert str(e.value).startswith(message), str(e.value)


def test_recipe_keys_pass_the_checks():
    check(data_cfg(name="imagefolder", augment=True, policy="trivialaugment", crop_scale=[0.08, 1.0],
                   train_crop_size=176, val_resize_size=232, val_crop_size=224, ra_reps=4, interpolation="bilinear"))
    check(data_cfg(augment=True, policy="augmix", color_jitter=0.4, ra_reps=2))


def test_policy_batches_are_a_pure_function_of_the_seed():
    """In-memory sets with a policy: a second stream and a disturbed global RNG give the same batches."""
    split = build_split(data_cfg(augment=True, policy="randaugment"))
    first = next(BatchStream(split.train, 16, 4, shuffle=True, drop_last=True).iter_epoch(2, 3))
    torch.manual_seed(123)
    torch.rand(7)
    again = next(BatchStream(split.train, 16, 4, shuffle=True, drop_last=True).iter_epoch(2, 3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
