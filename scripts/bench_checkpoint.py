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

The training stall per checkpoint, synchronous vs checkpoint.async_save (issue 17): the same training loop
(the model + AdamW on one fixed random batch) runs `--stall-steps` steps three ways, interleaved: without
checkpoints, saving every `--stall-every` steps with checkpoint.save, and with the asynchronous path the
Checkpointer takes (checkpoint.snapshot at the step boundary, checkpoint.write + publish on a background thread,
at most one write in flight, the last one waited for). Stall per checkpoint = (run time - run time without
checkpoints) / checkpoints; "blocked" is the time the step boundary itself waits (the whole save, or the
snapshot plus any wait for the previous write).

    python scripts/bench_checkpoint.py              # full run (resnet50; several minutes on a small CPU)
    python scripts/bench_checkpoint.py --quick      # smoke run (<30 s; resnet18), JSON to the temp dir
    python scripts/bench_checkpoint.py --stall-only # the stall table alone
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


def _stall_run(model, opt, batch, steps: int, every: int, how: str, d: Path) -> Dict[str, float]:
    """`steps` training steps, checkpointing every `every` (how: none | sync | async); wall seconds and the time
    the step boundaries were blocked by saves."""
    from trainrun import checkpoint

    x, y = batch
    writer = checkpoint.AsyncWriter()
    blocked, t0 = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if how == "none" or step % every != every // 2:  # every steps after each save train on: the last save
            continue                                     # is measured like the others, not as the run's end
        b0 = time.perf_counter()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": step}}
        meta = {"config": {}, "note": "bench"}
        if how == "sync":
            checkpoint.save(d, step, state, meta, keep_last=2)
        else:
            snap = checkpoint.snapshot(state)

            def write(step=step, snap=snap, meta=meta):
                path, _ = checkpoint.write(d, step, snap, meta)
                checkpoint.publish(d, path, None, mode="max", keep_best=False, keep_last=2)
                checkpoint.release_snapshot(snap)

            writer.submit(write)
        blocked += time.perf_counter() - b0
    b0 = time.perf_counter()
    writer.wait()  # the run ends when its last checkpoint is complete
    blocked += time.perf_counter() - b0
    return {"wall": time.perf_counter() - t0, "blocked": blocked}


def measure_stall(arch: str, steps: int, every: int, batch: int, size: int, reps: int, base: Path,
                  warmup: bool = True) -> Dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = getattr(torchvision.models, arch)(weights=None).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = (torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device))
    n_ckpt = len([s for s in range(1, steps + 1) if s % every == every // 2])
    runs: Dict[str, List[Dict[str, float]]] = {"none": [], "sync": [], "async": []}
    for rep in range(-1 if warmup else 0, reps):  # one untimed round first (allocator, optimizer state, page cache)
        for how in runs:
            d = Path(tempfile.mkdtemp(prefix="bench-stall-", dir=base))
            try:
                os.sync()
                gc.collect()
                r = _stall_run(model, opt, data, steps, every, how, d)
            finally:
                shutil.rmtree(d, ignore_errors=True)
            if rep >= 0:
                runs[how].append(r)
                print(f"  stall rep {rep + 1}/{reps} {how}: {r['wall']:.2f} s (blocked {r['blocked']:.2f} s)",
                      file=sys.stderr, flush=True)
    out: Dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "arch": arch, "steps": steps, "every": every, "checkpoints": n_ckpt, "batch": batch,
                           "image_size": size, "reps": reps, "optimizer": "AdamW",
                           "step_s": bu.summary([r["wall"] / steps for r in runs["none"]])}
    for how in ("sync", "async"):
        out[how] = {"stall_per_checkpoint_s": bu.summary([(r["wall"] - n["wall"]) / n_ckpt
                                                          for r, n in zip(runs[how], runs["none"])]),
                    "blocked_per_checkpoint_s": bu.summary([r["blocked"] / n_ckpt for r in runs[how]])}
    return out


def print_stall(st: Dict[str, Any]) -> None:
    print(f"\nTraining stall per checkpoint on {st['device']} ({st['threads']} CPU threads): torchvision "
          f"{st['arch']} + AdamW, batch {st['batch']} at "
          f"{st['image_size']} px, {st['steps']} steps, a checkpoint every {st['every']} ({st['checkpoints']} "
          f"per run); one step takes {bu.med_range(st['step_s'])} s; median (min-max) of {st['reps']} "
          f"interleaved repetitions\n")
    rows = [[how, bu.med_range(st[how]["stall_per_checkpoint_s"]), bu.med_range(st[how]["blocked_per_checkpoint_s"])]
            for how in ("sync", "async")]
    print(bu.table(["save", "stall per checkpoint (s)", "step boundary blocked (s)"], rows))


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
    ap.add_argument("--stall-only", action="store_true", help="only the sync-vs-async training stall")
    ap.add_argument("--no-stall", action="store_true", help="skip the sync-vs-async training stall")
    ap.add_argument("--stall-steps", type=int, default=None, help="steps per run (default 24; --quick 2)")
    ap.add_argument("--stall-every", type=int, default=None, help="steps between checkpoints (default 8; --quick 2)")
    ap.add_argument("--stall-batch", type=int, default=None, help="batch size (default 16; --quick 2)")
    ap.add_argument("--stall-size", type=int, default=None, help="image size (default 64; --quick 32)")
    args = ap.parse_args(argv)
    reps = args.reps or (2 if args.quick else 7)
    arch = args.arch or ("resnet18" if args.quick else "resnet50")
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    if args.stall_only:
        if args.quick:
            torch.set_num_threads(1)
        record = bu.header("bench_checkpoint", argv, args.quick)
        record["stall"] = _stall(args, arch, reps, base)
        out = bu.write_json(args.out or bu.default_out("bench_checkpoint", args.quick), record)
        print(f"raw numbers: {out}")
        return record
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = build_state(arch)
    nbytes = state_bytes(state)
    record = bu.header("bench_checkpoint", argv, args.quick)
    record.update({"arch": arch, "reps": reps, "tensor_bytes": nbytes, "results": {}})
    variants = {k: v for k, v in VARIANTS.items() if v is not v_trainrun_before or _has_internals()}
    times: Dict[str, List[float]] = {k: [] for k in variants}
    sizes: Dict[str, int] = {}
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
    if not args.no_stall:
        torch.set_num_threads(1 if args.quick else threads)  # training uses the machine's threads, as a run does
        record["stall"] = _stall(args, arch, reps, base)
    out = bu.write_json(args.out or bu.default_out("bench_checkpoint", args.quick), record)
    print(f"raw numbers: {out}")
    return record


def _stall(args, arch: str, reps: int, base: Path) -> Dict[str, Any]:
    q = args.quick
    st = measure_stall(arch, args.stall_steps or (2 if q else 24), args.stall_every or (2 if q else 8),
                       args.stall_batch or (2 if q else 16), args.stall_size or (32 if q else 64), reps, base,
                       warmup=not q)  # --quick: structure, not numbers
    print_stall(st)
    return st


if __name__ == "__main__":
    main()
