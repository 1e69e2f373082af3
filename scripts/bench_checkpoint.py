"""Checkpoint cost: `trainrun.checkpoint.save` vs plain `torch.save`.

The state: torchvision resnet50's state dict plus a populated Adam optimizer state (one optimizer step on a tiny
batch, so both moments exist): ~25.6 M parameters, ~300 MB on disk. Written, interleaved, each repetition into
a fresh directory (removed afterwards) on the same filesystem:

  trainrun          trainrun.checkpoint.save(run_dir, step, state, meta, keep_last=2): canonicalised pickle
                    written into a temporary folder while SHA256 is computed over the bytes, fsync of the file,
                    the digest file and meta.json (each fsynced), the folder renamed into place, `latest` replaced
                    atomically, retention
  trainrun before   the same call with the previous write internals (SHA256 computed inline in every write
                    call, torch.save's per-record CRC32s on), patched in for comparison
  torch.save        torch.save(state, path): no fsync (the data may still be only in the page cache)
  torch.save+fsync  torch.save into an open file, flush, os.fsync: the same durability as trainrun's
  torch.save+fsync+sha256 (re-read)   what hashing after the fact would cost: torch.save+fsync, then read the
                    file back and hash it

Target: trainrun within 1.2x of torch.save (also reported against torch.save+fsync).

    python scripts/bench_checkpoint.py              # full run (~1-2 min)
    python scripts/bench_checkpoint.py --quick      # smoke run (<30 s; resnet18), JSON to the temp dir
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

import torch  # noqa: E402


def build_state(arch: str) -> Dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # exp_avg and exp_avg_sq now exist for every parameter
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "trainer": {"step": 1, "epoch": 0, "batch_in_epoch": 1}}


def state_bytes(state: Dict[str, Any]) -> int:
    n = 0
    for v in state["model"].values():
        n += v.numel() * v.element_size()
    for s in state["optimizer"]["state"].values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                n += v.numel() * v.element_size()
    return n


def v_trainrun(state, d: Path) -> None:
    from trainrun import checkpoint

    checkpoint.save(d / "run", 1, state, {"config": {}, "note": "bench"}, keep_last=2)


class _SerialHashingWriter:
    """trainrun's writer before this benchmark's changes: SHA256 inline in every write call."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def v_trainrun_before(state, d: Path) -> None:
    """checkpoint.save with the previous internals: serial SHA256 in write(), torch.save with CRC32s."""
    from trainrun import checkpoint

    saved = checkpoint._HashingWriter, checkpoint._save_uncrc
    checkpoint._HashingWriter, checkpoint._save_uncrc = _SerialHashingWriter, torch.save
    try:
        checkpoint.save(d / "run", 1, state, {"config": {}, "note": "bench"}, keep_last=2)
    finally:
        checkpoint._HashingWriter, checkpoint._save_uncrc = saved


def v_torch_save(state, d: Path) -> None:
    torch.save(state, d / "state.pt")


def v_torch_save_fsync(state, d: Path) -> None:
    with open(d / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def v_torch_save_fsync_sha(state, d: Path) -> None:
    v_torch_save_fsync(state, d)
    h = hashlib.sha256()
    with open(d / "state.pt", "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    h.hexdigest()


VARIANTS: Dict[str, Callable] = {
    "trainrun": v_trainrun,
    "trainrun before (serial SHA256 + CRC32s)": v_trainrun_before,
    "torch.save": v_torch_save,
    "torch.save+fsync": v_torch_save_fsync,
    "torch.save+fsync+sha256 (re-read)": v_torch_save_fsync_sha,
}


def _has_internals() -> bool:
    from trainrun import checkpoint

    return hasattr(checkpoint, "_save_uncrc") and hasattr(checkpoint, "_HashingWriter")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet18, 2 repetitions")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7; --quick 2)")
    ap.add_argument("--arch", default=None, help="torchvision model (default resnet50; --quick resnet18)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: the temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 7)
    arch = args.arch or ("resnet18" if args.quick else "resnet50")
    torch.set_num_threads(1)
    state = build_state(arch)
    nbytes = state_bytes(state)
    record = bu.header("bench_checkpoint", argv, args.quick)
    record.update({"arch": arch, "reps": reps, "tensor_bytes": nbytes, "results": {}})
    variants = {k: v for k, v in VARIANTS.items() if v is not v_trainrun_before or _has_internals()}
    times: Dict[str, List[float]] = {k: [] for k in variants}
    sizes: Dict[str, int] = {}
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # one untimed round first (allocator, imports, page cache of the code)
    for rep in range(-1, reps):
        for name, fn in variants.items():  # interleaved
            d = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
            try:
                os.sync()  # start every write with no dirty pages from the previous one
                gc.collect()
                t0 = time.perf_counter()
                fn(state, d)
                dt = time.perf_counter() - t0
                sizes[name] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            finally:
                shutil.rmtree(d, ignore_errors=True)
            if rep >= 0:
                times[name].append(dt)
                print(f"  rep {rep + 1}/{reps} {name}: {dt:.3f} s", file=sys.stderr, flush=True)
    res = record["results"]
    res["seconds"] = {k: bu.summary(v) for k, v in times.items()}
    res["bytes_written"] = sizes
    res["MB_per_s"] = {k: sizes[k] / 1e6 / bu.median(v) for k, v in times.items()}
    for ref in ("torch.save", "torch.save+fsync"):
        res[f"ratio_trainrun_over_{ref}"] = bu.summary([a / b for a, b in zip(times["trainrun"], times[ref])])
    record["load_after"] = bu.load()
    record["wall_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\nCheckpoint of torchvision {arch} + Adam state ({nbytes / 2**20:.0f} MiB of tensors): seconds, median "
          f"(min-max) of {reps} interleaved repetitions; load before: {record['load_before']['uptime']}\n")
    rows = []
    for k in variants:
        rows.append([k, bu.med_range(res["seconds"][k]), f"{res['MB_per_s'][k]:.0f}", bu.human_bytes(sizes[k]),
                     bu.med_range(bu.summary([a / b for a, b in zip(times[k], times["torch.save"])]))])
    print(bu.table(["writer", "seconds", "MB/s", "bytes on disk", "x torch.save (per rep)"], rows))
    print(f"\ntrainrun / torch.save: {bu.med_range(res['ratio_trainrun_over_torch.save'])}; "
          f"trainrun / (torch.save+fsync): {bu.med_range(res['ratio_trainrun_over_torch.save+fsync'])} (target <= 1.2)")
    out = bu.write_json(args.out or bu.default_out("bench_checkpoint", args.quick), record)
    print(f"raw numbers: {out}")
    return record


if __name__ == "__main__":
    main()
