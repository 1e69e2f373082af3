"""Write an ImageFolder of real-photo JPEGs at ImageNet-like sizes, offline and deterministic.

    python scripts/make_imagefolder.py OUT --classes 8 --per-class 40 --size 500 [--val-per-class 10] [--seed 0]

writes OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg (`data=imagefolder data.root=OUT` reads it). Each class is
one photo that ships inside scikit-image (no download): every sample is a random crop of it (a quarter to all of
its area, at the output's aspect ratio), rescaled to an ImageNet-typical size (long side `--size`, mostly 500 x 375
and its portrait / 3:2 / square variants, a third of them smaller), randomly mirrored, with a mild brightness and
contrast change, and JPEG-encoded at quality 90 with 4:2:0 chroma subsampling, as most ImageNet files are.
Classes differ in content, so a network learns them, but crops of one photo vary enough that it takes training.

Same seed, same files (byte-identical with the same Pillow/libjpeg). Importable: `make_imagefolder(out, ...)`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

# Colour photos first, then greyscale ones (written as RGB). `cat` is chelsea again and `logo` is a drawing: left out.
SOURCES: List[str] = [
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page", "text", "cell",
]
# (width, height) ratios of ImageNet photos, landscape 4:3 the most common.
ASPECTS = [(4 / 3, 0.45), (3 / 2, 0.2), (1.0, 0.1), (3 / 4, 0.15), (2 / 3, 0.1)]
SPLITS = {"train": 0, "val": 1}
QUALITY = 90


def _load_source(name: str) -> np.ndarray:
    """The named scikit-image photo as an HxWx3 uint8 array."""
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "motorcycle":
            img = skimage.data.stereo_motorcycle()[0]
        else:
            img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (img.astype(np.float64) / max(float(img.max()), 1.0) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _output_size(rng: np.random.Generator, size: int) -> tuple:
    ratios, weights = zip(*ASPECTS)
    ratio = ratios[rng.choice(len(ratios), p=np.asarray(weights) / sum(weights))]
    long_side = size if rng.random() < 2 / 3 else int(round(size * rng.uniform(0.6, 1.0)))
    if ratio >= 1:
        return long_side, max(1, int(round(long_side / ratio)))
    return max(1, int(round(long_side * ratio))), long_side


def render_sample(src: np.ndarray, rng: np.random.Generator, size: int):
    """One sample of a source photo: random crop at the output's aspect ratio, resize, mirror, brightness/contrast."""
    from PIL import Image, ImageEnhance

    out_w, out_h = _output_size(rng, size)
    h, w = src.shape[:2]
    area = rng.uniform(0.25, 1.0) * h * w
    crop_w = min(w, int(round(np.sqrt(area * out_w / out_h))))
    crop_h = min(h, int(round(crop_w * out_h / out_w)))
    x0 = int(rng.integers(0, w - crop_w + 1))
    y0 = int(rng.integers(0, h - crop_h + 1))
    img = Image.fromarray(src[y0:y0 + crop_h, x0:x0 + crop_w]).resize((out_w, out_h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))


def make_imagefolder(out, classes: int, per_class: int, size: int = 500, seed: int = 0,
                     val_per_class: Optional[int] = None, quality: int = QUALITY,
                     log: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    """Write out/train and out/val; returns {"root", "classes", "train", "val", "bytes"}. Refuses a non-empty out."""
    out = Path(out)
    if not 1 <= classes <= len(SOURCES):
        raise ValueError(f"--classes {classes}: there are {len(SOURCES)} source photos; use 1..{len(SOURCES)}")
    if per_class < 1:
        raise ValueError(f"--per-class {per_class}: need at least 1 image per class")
    if size < 32:
        raise ValueError(f"--size {size}: the long side must be at least 32 pixels (ImageNet-like: 500)")
    if not 1 <= quality <= 95:
        raise ValueError(f"--quality {quality}: Pillow's JPEG quality is 1..95")
    val_per_class = max(1, per_class // 4) if val_per_class is None else val_per_class
    if val_per_class < 0:
        raise ValueError(f"--val-per-class {val_per_class}: must be >= 0")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder (files are never overwritten)")
    names = SOURCES[:classes]
    counts = {"train": per_class, "val": val_per_class}
    total_bytes = 0
    for c, name in enumerate(names):
        src = _load_source(name)
        for split, n in counts.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, SPLITS[split], c, i])
                path = folder / f"{name}_{i:05d}.jpg"
                render_sample(src, rng, size).save(path, "JPEG", quality=quality, subsampling="4:2:0")
                total_bytes += path.stat().st_size
        if log:
            log(f"{name}: {counts['train']} train + {counts['val']} val")
    return {"root": str(out), "classes": names, "train": per_class * classes, "val": val_per_class * classes,
            "bytes": total_bytes}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to create (must be new or empty)")
    p.add_argument("--classes", type=int, default=8, help=f"number of classes, 1..{len(SOURCES)} (default 8)")
    p.add_argument("--per-class", type=int, default=40, help="train images per class (default 40)")
    p.add_argument("--val-per-class", type=int, default=None, help="val images per class (default per-class // 4)")
    p.add_argument("--size", type=int, default=500, help="long side in pixels (default 500, as ImageNet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality (default 90)")
    a = p.parse_args(argv)
    try:
        info = make_imagefolder(a.out, a.classes, a.per_class, a.size, a.seed, a.val_per_class, a.quality,
                                log=lambda s: print(s, flush=True))
    except ValueError as e:
        print(f"make_imagefolder: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['train']} train + {info['val']} val JPEGs ({info['bytes'] / 1e6:.1f} MB) of "
          f"{len(info['classes'])} classes to {info['root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
