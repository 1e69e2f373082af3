"""Input pipeline: decoded + augmented images/s for the ResNet-50 recipe's train transform, trainrun vs the
torchvision reference script's own loader, on the same ImageNet-size JPEGs and the same cores.

Data: scripts/make_imagefolder.py's real-photo JPEGs (long side 500, mostly 500 x 375, quality 90, 4:2:0), written
once to a temp folder. Transform (the recipe's, issue #16): RandomResizedCrop(176, scale 0.08-1, bilinear) +
horizontal flip + TrivialAugmentWide + to float + ImageNet normalisation (random erasing is a batch op in trainrun
and left out of both sides).

Rows (each with DataLoader workers 0 / 1 / 2, batch 64 (--quick: 16), persistent workers, warm epochs only):
  trainrun decode_jpeg   trainrun's own path: data=imagefolder's FileSet through BatchStream, per-sample seeded
                         augmentation, decode by trainrun.data.decode.load_rgb (decode_jpeg, trainrun's default)
  trainrun PIL           the same with the image decoded by PIL (what trainrun used before)
  reference              torchvision's references/classification/train.py loader: datasets.ImageFolder (PIL
                         default_loader) + presets.ClassificationPresetTrain(crop_size=176, auto_augment_policy=
                         "ta_wide", random_erase_prob=0) - v1 transforms on PIL images, as its default backend -
                         in a DataLoader(shuffle, pin_memory as the script) with the same workers and batch size
And decode only (one process): PIL `Image.open().convert("RGB")` vs torchvision.io.decode_jpeg, images/s, plus
whether both give identical pixels on every file.

images/s per worker = images/s / max(1, workers): with 0 workers the main process does the work on one core. The
main process runs with torch.set_num_threads(1), as DataLoader workers do. Besides wall-clock images/s, every row
reports images per CPU-second (user + system time of the process and its workers, psutil): on a busy shared machine
wall time counts the time other processes hold the cores, CPU time does not, so it is the steadier figure of what a
core delivers. Variants are interleaved per repetition and reported as median (min-max).

    python scripts/bench_input.py                # full run (~3-5 min on 2 cores), JSON to docs/bench/bench_input.json
    python scripts/bench_input.py --quick        # smoke run (< 30 s), JSON to the temp dir
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from make_imagefolder import make_imagefolder  # noqa: E402

import torch  # noqa: E402

CROP = 176
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECIPE_OVERRIDES = ["data=imagefolder", "data.augment=true", "data.policy=trivialaugment",
                    f"data.train_crop_size={CROP}", "data.image_size=224", "data.crop_scale=[0.08,1.0]",
                    "data.interpolation=bilinear", "data.num_workers=0"]


@functools.lru_cache(maxsize=None)
def compose(overrides: tuple):
    """The composed config (once per override set: Hydra's compose costs seconds)."""
    from hydra import compose as hcompose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="bench_input"):
        return hcompose("config", overrides=list(overrides))


def trainrun_train_set(root: Path, decoder: str):
    """data=imagefolder's training FileSet with the recipe's transform; decoder 'decode_jpeg' (trainrun's default
    loader) or 'pil'."""
    from trainrun.data.datasets import build_split
    from trainrun.data.decode import load_rgb, load_rgb_pil

    cfg = compose((*RECIPE_OVERRIDES, f"data.root={root}"))
    split = build_split(cfg.data)
    train = split.train
    train.base.loader = {"decode_jpeg": load_rgb, "pil": load_rgb_pil}[decoder]
    return train


def reference_train_set(root: Path):
    """torchvision's reference loader: ImageFolder + the transform that references/classification/presets.py
    ClassificationPresetTrain builds for crop_size=176, auto_augment_policy='ta_wide', interpolation bilinear,
    hflip_prob=0.5 (pytorch/vision, the PIL backend that is its default), composed here from torchvision's classes."""
    import torchvision
    from torchvision import transforms as T
    from torchvision.transforms.functional import InterpolationMode

    tf = T.Compose([T.RandomResizedCrop(CROP, interpolation=InterpolationMode.BILINEAR), T.RandomHorizontalFlip(0.5),
                    T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR), T.PILToTensor(),
                    T.ConvertImageDtype(torch.float), T.Normalize(mean=MEAN, std=STD)])
    return torchvision.datasets.ImageFolder(str(root / "train"), tf)


def trainrun_epochs(train, batch: int, workers: int):
    from trainrun.data.loader import BatchStream

    stream = BatchStream(train, batch, 0, shuffle=True, drop_last=True, num_workers=workers,
                         persistent_workers=True)
    return lambda epoch: sum(len(y) for _, y, _ in stream.iter_epoch(epoch))


def reference_epochs(ds, batch: int, workers: int):
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return lambda epoch: sum(len(y) for _, y in loader)


def decode_rates(files: List[Path], reps: int) -> Dict[str, Any]:
    """Single-process decode images/s, PIL vs decode_jpeg, and whether they agree on every pixel of every file."""
    from trainrun.data.decode import decode_jpeg_tv, decode_pil, read_bytes

    blobs = [read_bytes(f) for f in files]  # decode only: the page cache and file reads are not what differs
    rates: Dict[str, List[float]] = {"pil": [], "decode_jpeg": []}
    per_cpu: Dict[str, List[float]] = {"pil": [], "decode_jpeg": []}
    for b in blobs[:4]:  # warm: PIL's plugin imports and first-call set-up are not per-image costs
        decode_pil(b), decode_jpeg_tv(b)
    for _ in range(reps):
        for name, fn in (("pil", decode_pil), ("decode_jpeg", decode_jpeg_tv)):
            t, c = time.perf_counter(), time.process_time()
            for b in blobs:
                fn(b)
            rates[name].append(len(blobs) / (time.perf_counter() - t))
            per_cpu[name].append(len(blobs) / max(time.process_time() - c, 1e-9))
    differ = [str(f) for f, b in zip(files, blobs) if not torch.equal(decode_pil(b), decode_jpeg_tv(b))]
    return {"images": len(files), "pil": bu.summary(rates["pil"]), "decode_jpeg": bu.summary(rates["decode_jpeg"]),
            "pil_per_cpu_s": bu.summary(per_cpu["pil"]), "decode_jpeg_per_cpu_s": bu.summary(per_cpu["decode_jpeg"]),
            "speedup": bu.median(rates["decode_jpeg"]) / bu.median(rates["pil"]),
            "speedup_cpu": bu.median(per_cpu["decode_jpeg"]) / bu.median(per_cpu["pil"]),
            "files_with_different_pixels": differ}


def first_batch(root: Path, decoder: str, batch: int) -> torch.Tensor:
    from trainrun.data.loader import BatchStream

    stream = BatchStream(trainrun_train_set(root, decoder), batch, 0, shuffle=True, drop_last=True)
    return next(iter(stream.iter_epoch(0)))[0]


def first_batches_equal(root: Path, batch: int) -> bool:
    """trainrun's batches are the same whichever decoder reads the files (same pixels, same per-sample seeds)."""
    return torch.equal(first_batch(root, "decode_jpeg", batch), first_batch(root, "pil", batch))


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (the DataLoader workers): unlike wall
    time, they do not grow while other processes hold the cores of a busy machine."""
    try:
        import psutil
    except ImportError:  # without psutil: this process only (exact for workers=0)
        return time.process_time()
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # a worker that just exited
            continue
        total += t.user + t.system
    return total


def bench_pipelines(root: Path, batch: int, workers: List[int], reps: int) -> Dict[str, Any]:
    """images/s of one warm epoch per repetition for every (pipeline, workers), interleaved."""
    makers = {"trainrun decode_jpeg": lambda w: trainrun_epochs(trainrun_train_set(root, "decode_jpeg"), batch, w),
              "trainrun PIL": lambda w: trainrun_epochs(trainrun_train_set(root, "pil"), batch, w),
              "reference": lambda w: reference_epochs(reference_train_set(root), batch, w)}
    results: Dict[str, Dict[str, Any]] = {}
    for w in workers:
        epochs = {name: make(w) for name, make in makers.items()}
        for fn in epochs.values():
            fn(0)  # warm: worker start-up, imports, page cache
        rates: Dict[str, List[float]] = {name: [] for name in epochs}
        per_cpu: Dict[str, List[float]] = {name: [] for name in epochs}
        for rep in range(reps):
            for name, fn in epochs.items():
                t, c = time.perf_counter(), cpu_seconds()
                n = fn(rep + 1)
                rates[name].append(n / (time.perf_counter() - t))
                per_cpu[name].append(n / max(cpu_seconds() - c, 1e-9))
        for name, r in rates.items():
            s = bu.summary(r)
            results[f"{name} | w{w}"] = {"pipeline": name, "workers": w, "images_per_s": s,
                                         "images_per_s_per_worker": s["median"] / max(1, w),
                                         "images_per_cpu_s": bu.summary(per_cpu[name])}
        del epochs
    return results


def table(decode: Dict[str, Any], pipes: Dict[str, Any], workers: List[int]) -> str:
    rows = [["decode only (1 process): images/s", "-", bu.med_range(decode["pil"]), bu.med_range(decode["decode_jpeg"]),
             "-", f"decode_jpeg / PIL {decode['speedup']:.2f}x"],
            ["decode only (1 process): images per CPU-second", "-", bu.med_range(decode["pil_per_cpu_s"]),
             bu.med_range(decode["decode_jpeg_per_cpu_s"]), "-", f"decode_jpeg / PIL {decode['speedup_cpu']:.2f}x"]]
    names = ("trainrun PIL", "trainrun decode_jpeg", "reference")
    for w in workers:
        get = {p: pipes[f"{p} | w{w}"] for p in names}
        for measure, label in (("images_per_s", "images/s"), ("images_per_cpu_s", "images per CPU-second")):
            ratio = get["trainrun decode_jpeg"][measure]["median"] / get["reference"][measure]["median"]
            rows.append([f"recipe train transform, workers {w}: {label}",
                         bu.fmt(get["trainrun decode_jpeg"]["images_per_s_per_worker"]) if measure == "images_per_s"
                         else "-", *(bu.med_range(get[p][measure]) for p in names),
                         f"trainrun / reference {ratio:.2f}x"])
    return bu.table(["measure", "trainrun images/s per worker", "trainrun PIL", "trainrun decode_jpeg (default)",
                     "torchvision reference", "ratio"], rows)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 30 s)")
    p.add_argument("--data", type=Path, default=None, help="an existing make_imagefolder output to use")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 1 2; quick: 0)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; quick: 16)")
    p.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    quick = args.quick
    workers = args.workers or ([0] if quick else [0, 1, 2])
    reps = args.reps or (1 if quick else 3)
    batch = args.batch or (16 if quick else 64)
    torch.set_num_threads(1)
    record = bu.header("bench_input", argv, quick)
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        root = args.data or Path(tmp) / "jpegs"
        if args.data is None:
            record["data"] = make_imagefolder(root, classes=4 if quick else 8, per_class=8 if quick else 32,
                                              size=500, seed=0, val_per_class=1)
        files = sorted((root / "train").rglob("*.jpg"))
        record["decode"] = decode_rates(files, reps)
        record["decoders_give_same_batch"] = first_batches_equal(root, batch)
        record["trainrun_overrides"] = RECIPE_OVERRIDES
        record["pipelines"] = bench_pipelines(root, batch, workers, reps)
    record.update(batch=batch, workers=workers, reps=reps, crop=CROP, load_after=bu.load())
    record["table"] = table(record["decode"], record["pipelines"], workers)
    print(record["table"])
    out = bu.write_json(args.out or bu.default_out("bench_input", quick), record)
    print(f"JSON: {out}")
    return record


if __name__ == "__main__":
    main()
