"""Data loading: trainrun's BatchStream vs torch DataLoader, in memory and from image files.

In-memory sets (digits: 1,438 x 1x8x8 train samples; synthetic: 8,000 x 3x32x32, `data.num_samples=10000`),
batch 64, shuffled, full batches only:

  BatchStream            trainrun's tensor-resident stream: x[idx], y[idx] of the epoch's permutation (what a
                         trainrun run uses for every in-memory set)
  DataLoader w0          DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True): per-sample
                         indexing + default_collate in the main process
  DataLoader w2          the same with 2 worker processes, started anew every epoch
  DataLoader w2 persistent   persistent_workers=True (workers live across epochs)
  DataLoader w2 persistent pin   + pin_memory=True: with no GPU here torch skips the pinning (it only warns), so
                         this row shows the flag costs nothing on a CPU-only machine

Reported: batches/s over several epochs (worker start-up included where it happens), and the share of a training
step the loading would take if it is not overlapped with compute: load / (load + step), with the step time of
trainrun's default CNN on a preloaded batch of the same data (measured here, 1 thread). Worker processes can
overlap loading with compute only when there are idle cores; this machine has 2.

Image files (`data=imagefolder`, PNGs written with PIL into a temp dir, 128x128 RGB, 10 classes (--quick: 64x64, 4 classes);
`data.image_size=64 data.augment=true` (--quick: 32): random resized crop + flip, seeded per sample), loaded through
BatchStream's DataLoader path with num_workers 0/1/2, workers started every epoch or kept alive
(`persistent_workers=True`, added to BatchStream for this). Batches are bit-identical in every configuration
(tested in tests/test_data_and_checkpoint.py); the script checks it again on the first epoch.

    python scripts/bench_data.py              # full run (~2-3 min)
    python scripts/bench_data.py --quick      # smoke run (<30 s), JSON to the temp dir
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH = 64


def compose(overrides: List[str]):
    from hydra import compose as hcompose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="bench_data"):
        return hcompose("config", overrides=overrides)


# ------------------------------------------------------------------------------------------- in-memory loaders

def mem_loaders(train) -> Dict[str, Callable[[], Callable[[int], Any]]]:
    """name -> factory; a factory builds the loader once, returns `epoch -> iterable of (x, y, ...)`."""
    from torch.utils.data import DataLoader, TensorDataset

    from trainrun.data import BatchStream

    def batchstream():
        s = BatchStream(train, BATCH, 0, shuffle=True, drop_last=True)
        return s.iter_epoch

    def dataloader(**kw):
        def factory():
            g = torch.Generator().manual_seed(0)
            dl = DataLoader(TensorDataset(train.x, train.y), batch_size=BATCH, shuffle=True, drop_last=True,
                            generator=g, **kw)
            return lambda epoch: dl
        return factory

    return {
        "BatchStream (tensor-resident)": batchstream,
        "DataLoader w0": dataloader(num_workers=0),
        "DataLoader w2": dataloader(num_workers=2),
        "DataLoader w2 persistent": dataloader(num_workers=2, persistent_workers=True),
        "DataLoader w2 persistent pin_memory": dataloader(num_workers=2, persistent_workers=True, pin_memory=True),
    }


def time_epochs(make_epoch: Callable[[int], Any], epochs: int) -> Dict[str, float]:
    n, first = 0, []
    t0 = time.perf_counter()
    for e in range(epochs):
        te = time.perf_counter()
        for i, b in enumerate(make_epoch(e)):
            if i == 0:
                first.append(time.perf_counter() - te)
            n += 1
    dt = time.perf_counter() - t0
    return {"seconds": dt, "batches": n, "batches_per_s": n / dt, "first_batch_s": bu.median(first)}


def step_time(train, model_cfg_overrides: List[str], steps: int) -> float:
    """Seconds per training step of trainrun's default CNN (AdamW) on preloaded batches of this data."""
    from trainrun.models import build_model
    from trainrun.optim import build_optimizer

    cfg = compose(model_cfg_overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(train.x.shape[1:]), int(train.y.max()) + 1, 0.0)
    opt = build_optimizer(model, cfg.optimizer, BATCH)
    idx = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))
    batches = [(train.x[idx[i:i + BATCH]], train.y[idx[i:i + BATCH]])
               for i in range(0, len(idx) - BATCH + 1, BATCH)][:steps + 3]
    model.train()

    def one(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for x, y in batches[:3]:
        one(x, y)
    t0 = time.perf_counter()
    for x, y in batches[3:]:
        one(x, y)
    return (time.perf_counter() - t0) / len(batches[3:])


# ------------------------------------------------------------------------------------------- image files

def make_images(root: Path, classes: int, per_class: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (3,), dtype=np.uint8)
        for i in range(per_class):
            # smooth-ish images (a colour plus noise) so PNG decoding costs what photos' would, roughly
            arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(d / f"img{i:04d}.png")


def file_variants() -> Dict[str, Dict[str, Any]]:
    return {
        "w0": {"num_workers": 0},
        "w1": {"num_workers": 1},
        "w1 persistent": {"num_workers": 1, "persistent_workers": True},
        "w2": {"num_workers": 2},
        "w2 persistent": {"num_workers": 2, "persistent_workers": True},
        "w2 persistent prefetch 4": {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 4},
    }


def make_file_stream(train, kw: Dict[str, Any]):
    from trainrun.data import BatchStream

    try:
        return BatchStream(train, BATCH, 0, shuffle=True, drop_last=True, **kw)
    except TypeError:  # a BatchStream without persistent_workers / prefetch_factor
        return None


def bench_files(record: Dict[str, Any], quick: bool, reps: int) -> List[List[str]]:
    """Image files through BatchStream's DataLoader path: workers 0/1/2, started every epoch or persistent."""
    from trainrun.data import build_split

    classes, per_class = (4, 40) if quick else (10, 64)
    png, size = (64, 32) if quick else (128, 64)
    epochs = 2 if quick else 3
    file_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as d:
        root = Path(d) / "images"
        t0 = time.perf_counter()
        make_images(root, classes, per_class, png)
        gen_s = time.perf_counter() - t0
        cfg = compose(["data=imagefolder", f"data.root={root}", f"data.image_size={size}", "data.augment=true",
                       f"data.batch_size={BATCH}", "data.val_fraction=0.1"])
        split = build_split(cfg.data)
        variants = file_variants()
        streams = {name: make_file_stream(split.train, kw) for name, kw in variants.items()}
        skipped = [n for n, s in streams.items() if s is None]
        streams = {n: s for n, s in streams.items() if s is not None}
        # the same batches everywhere (epoch 0), and every persistent loader started before timing
        ref = [(x.clone(), y.clone()) for x, y, _ in streams["w0"].iter_epoch(0)]
        identical = {}
        for name, s in streams.items():
            got = [(x.clone(), y.clone()) for x, y, _ in s.iter_epoch(0)]
            identical[name] = len(got) == len(ref) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                           for a, b in zip(got, ref))
        per: Dict[str, List[Dict[str, float]]] = {k: [] for k in streams}
        for rep in range(reps):
            for name, s in streams.items():  # interleaved
                gc.collect()
                per[name].append(time_epochs(lambda e, s=s: s.iter_epoch(e + 1), epochs))
            print(f"  image files rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)
        record["files"] = {"images": classes * per_class, "train_samples": len(split.train), "png_size": png,
                           "image_size": size, "augment": True, "epochs_per_measure": epochs,
                           "generate_s": round(gen_s, 2), "skipped_variants": skipped,
                           "identical_batches": identical, "variants": {}}
        w0 = bu.median([r["batches_per_s"] for r in per["w0"]])
        for name in streams:
            bps = bu.summary([r["batches_per_s"] for r in per[name]])
            fb = bu.summary([r["first_batch_s"] for r in per[name]])
            record["files"]["variants"][name] = {**variants[name], "batches_per_s": bps, "first_batch_s": fb}
            file_rows.append([name, bu.med_range(bps), f"{bps['median'] / w0:.2f}x", bu.med_range(fb, 2),
                              "yes" if identical[name] else "NO"])
        del streams
        gc.collect()
    return file_rows


# ------------------------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, small sets")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; --quick 1)")
    ap.add_argument("--memory-sets", nargs="*", default=["digits", "synthetic"], choices=["digits", "synthetic"],
                    help="in-memory sets to measure (none: skip)")
    ap.add_argument("--no-files", action="store_true", help="skip the image-file part")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    quick = args.quick
    reps = args.reps or (1 if quick else 5)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    from trainrun.data import build_split

    record = bu.header("bench_data", argv, quick)
    record.update({"reps": reps, "batch_size": BATCH, "pin_memory_note":
                   "no accelerator here: DataLoader(pin_memory=True) warns and does not pin", "memory": [],
                   "files": {}})
    t_start = time.perf_counter()
    mem_sets = {
        "digits": (["data=digits"], 3 if quick else 10),
        "synthetic 3x32x32": (["data=synthetic", "data.input_shape=[3,32,32]",
                               f"data.num_samples={2000 if quick else 10000}"], 1 if quick else 3),
    }
    mem_sets = {k: v for k, v in mem_sets.items() if k.split()[0] in args.memory_sets}
    mem_rows = []
    for set_name, (ov, epochs) in mem_sets.items():
        split = build_split(compose(ov).data)
        train = split.train
        loaders = mem_loaders(train)
        made = {name: f() for name, f in loaders.items()}  # persistent loaders live across repetitions
        for name, ep in made.items():  # warm: workers started, pages touched
            time_epochs(ep, 1)
        per: Dict[str, List[Dict[str, float]]] = {k: [] for k in made}
        steps: List[float] = []
        for rep in range(reps):
            for name, ep in made.items():
                gc.collect()
                per[name].append(time_epochs(ep, epochs))
            steps.append(step_time(train, ["model=cnn", *ov], 10 if quick else 30))
            print(f"  {set_name} rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)
        step_s = bu.median(steps)
        for name in made:
            bps = bu.summary([r["batches_per_s"] for r in per[name]])
            load_s = 1 / bps["median"]
            entry = {"dataset": set_name, "loader": name, "train_samples": len(train.y),
                     "input_shape": list(train.x.shape[1:]), "epochs_per_measure": epochs, "batches_per_s": bps,
                     "first_batch_s": bu.summary([r["first_batch_s"] for r in per[name]]),
                     "cnn_step_s": bu.summary(steps), "load_share_of_step": load_s / (load_s + step_s)}
            record["memory"].append(entry)
            mem_rows.append([set_name, name, bu.med_range(bps), f"{1000 * load_s:.3f}", f"{1000 * step_s:.2f}",
                             f"{100 * entry['load_share_of_step']:.1f}%"])
        del made
        gc.collect()

    # ---- image files
    file_rows = [] if args.no_files else bench_files(record, quick, reps)
    record["load_after"] = bu.load()
    record["wall_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\nIn-memory data, batch {BATCH}: batches/s median (min-max) of {reps} interleaved repetitions; load share ="
          f" load / (load + CNN step), not overlapped; load before: {record['load_before']['uptime']}\n")
    print(bu.table(["dataset", "loader", "batches/s", "load ms/batch", "CNN step ms", "load share of a step"],
                   mem_rows))
    f = record["files"]
    if f:
        print(f"\nImage files: {f['train_samples']} train PNGs ({f['png_size']}x{f['png_size']} -> random resized "
              f"crop {f['image_size']} + flip), batch {BATCH}, {f['epochs_per_measure']} epochs per measurement, "
              "through BatchStream's DataLoader path\n")
        print(bu.table(["workers", "batches/s", "vs w0", "first batch of an epoch, s", "same batches as w0"],
                       file_rows))
        if f["skipped_variants"]:
            print(f"skipped (BatchStream has no persistent_workers/prefetch_factor): {', '.join(f['skipped_variants'])}")
    out = bu.write_json(args.out or bu.default_out("bench_data", quick), record)
    print(f"raw numbers: {out}")
    return record


if __name__ == "__main__":
    main()
