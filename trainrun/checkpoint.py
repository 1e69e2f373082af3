"""Checkpoints: atomic save with SHA256, meta.json, retention, `latest`/`best` pointers, verified load.

Layout inside a run directory:
    checkpoints/step_000123/state.pt         torch.save of the state (weights_only-loadable)
    checkpoints/step_000123/state.pt.sha256  hex digest of state.pt, computed while writing
    checkpoints/step_000123/meta.json        provenance + the digest
    checkpoints/latest                       name of the newest complete checkpoint
    checkpoints/best                         name of the best checkpoint by the monitored metric

A checkpoint is written into a temporary folder, fsynced, then renamed into place; `latest` is
replaced (tmp + rename) only after that, so a crash at any point leaves the previous state intact.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from trainrun.errors import CheckpointError

STATE, DIGEST, META = "state.pt", "state.pt.sha256", "meta.json"


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes the bytes as they go to disk (no re-read).

    The SHA256 runs on a helper thread (hashlib releases the GIL), so it overlaps the pickling, the write calls
    and the final fsync instead of adding to them. The bytes torch hands to `write` may live only for that call
    (a GPU storage's temporary CPU copy), so the thread hashes copies: small writes coalesced into 1 MiB blocks,
    large ones in 8 MiB pieces, at most 16 blocks (~128 MiB) in flight. `h` waits for the thread to finish, so
    `w.h.hexdigest()` after the last write is the digest of exactly the bytes written, in order.

    Every 32 MiB it also asks the kernel to start writing the finished range to disk (on Linux posix_fadvise
    DONTNEED starts that writeback without waiting for it, and drops the range's pages that are already clean),
    so the final fsync waits for the tail only, not for the whole file; durability is unchanged: the caller
    still fsyncs."""

    BLOCK, PIECE, IN_FLIGHT, WRITEBACK = 1 << 20, 8 << 20, 16, 32 << 20

    def __init__(self, f):
        import queue
        import threading

        self.f, self._h, self.n = f, hashlib.sha256(), 0
        self._error: Optional[BaseException] = None
        self._small = bytearray()
        self._q: "queue.Queue" = queue.Queue(maxsize=self.IN_FLIGHT)
        self._thread = threading.Thread(target=self._hash_blocks, name="trainrun-sha256", daemon=True)
        self._thread.start()
        self._fd, self._written_back = None, 0
        if hasattr(os, "posix_fadvise"):
            try:
                self._fd = f.fileno()
            except (AttributeError, OSError, io.UnsupportedOperation):
                pass

    def _hash_blocks(self) -> None:
        while True:
            block = self._q.get()
            if block is None:
                return
            if self._error is None:
                try:
                    self._h.update(block)
                except BaseException as e:  # noqa: BLE001  (kept for `h`; the queue keeps draining: no deadlock)
                    self._error = e

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        if n < self.BLOCK:
            self._small += mv
            if len(self._small) >= self.BLOCK:
                self._q.put(bytes(self._small))
                self._small.clear()
        else:
            if self._small:
                self._q.put(bytes(self._small))
                self._small.clear()
            for i in range(0, n, self.PIECE):
                self._q.put(mv[i:i + self.PIECE].tobytes())
        self.n += n
        written = self.f.write(mv)
        if self._fd is not None and self.n - self._written_back >= self.WRITEBACK:
            self.f.flush()
            try:
                os.posix_fadvise(self._fd, self._written_back, self.n - self._written_back, os.POSIX_FADV_DONTNEED)
            except OSError:
                self._fd = None  # a file system without it: the final fsync writes everything, as before
            self._written_back = self.n
        return written

    def _finish(self) -> None:
        if self._thread.is_alive():
            if self._small:
                self._q.put(bytes(self._small))
                self._small.clear()
            self._q.put(None)
            self._thread.join()

    @property
    def h(self):
        """The hash object, complete: waits for the hashing thread to take in every byte written so far."""
        self._finish()
        if self._error is not None:
            raise self._error
        return self._h

    def close(self) -> None:  # also reached from __del__ when a save fails half-way: the thread never lingers
        try:
            self._finish()
        finally:
            super().close()


def _save_uncrc(obj: Any, w: io.RawIOBase) -> None:
    """torch.save without the zip records' CRC32s (torch >= 2.6 can skip them; ~0.6 s/GB of pickling time): the
    SHA256 over the whole file, verified before every load, already guards every byte. Deterministic: the same
    state always gives the same bytes."""
    try:
        from torch.utils.serialization import config as _ser_config
        crc = _ser_config.save.compute_crc32
    except (ImportError, AttributeError):  # older torch: CRC32s are always written
        torch.save(obj, w)
        return
    _ser_config.save.compute_crc32 = False
    try:
        torch.save(obj, w)
    finally:
        _ser_config.save.compute_crc32 = crc


def canonical(obj: Any) -> Any:
    """Rebuild containers and intern strings so the pickle's bytes depend only on the values.

    Pickle memoizes by object identity: a key loaded from an earlier checkpoint is a different str object
    than the same literal in a fresh run, which changes the bytes (and the SHA256) of an equal state.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(canonical(v) for v in obj)
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(run_dir: Path) -> List[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
                   and (p / META).is_file()), key=lambda p: p.name)


def read_pointer(run_dir: Path, name: str) -> Optional[Path]:
    ptr = Path(run_dir) / "checkpoints" / name
    if not ptr.is_file():
        return None
    target = ptr.parent / ptr.read_text().strip()
    return target if target.is_dir() else None


def _disk_full(e: Optional[BaseException]) -> bool:
    """Whether `e` or an error behind it is ENOSPC/EDQUOT (torch.save turns the OSError into a RuntimeError)."""
    seen = []
    while e is not None and e not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.append(e)
        e = e.__cause__ or e.__context__
    return False


def _disk_full_message(run_dir: Path, final: Path, written: int) -> str:
    """One line: where, how much room a checkpoint needs (the previous one's size) and how much is free, the fix."""
    prev = read_pointer(run_dir, "latest")
    need = written
    try:
        need = max(need, sum(f.stat().st_size for f in prev.iterdir())) if prev is not None else need
        free = f"{shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous checkpoint {prev.name} is intact" if prev is not None else "no checkpoint was written"
    return (f"disk full: no space left to write checkpoint {final} (a checkpoint needs about {need / 2**20:.1f} MiB, "
            f"{free}); {kept}; free disk space or set output_root to a larger disk, then continue with "
            f"resume={Path(run_dir)}")


def save(run_dir: Path, step: int, state: Dict[str, Any], meta: Dict[str, Any], *, keep_last: int,
         metric: Optional[float] = None, mode: str = "max", keep_best: bool = True) -> Tuple[Path, str]:
    """Write checkpoint `step` atomically, update `latest` (and `best`), apply retention. Returns (dir, sha256)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open(tmp / STATE, "wb") as f:
            w = _HashingWriter(f)
            _save_uncrc(canonical(state), w)
            f.flush()
            os.fsync(f.fileno())
        sha = w.h.hexdigest()
        meta = {**meta, "step": step, "sha256": sha, "state_bytes": w.n}
        if metric is not None:
            meta["monitor_value"] = metric
        for name, text in ((DIGEST, f"{sha}  {STATE}\n"), (META, json.dumps(meta, indent=2, sort_keys=True, default=str))):
            with open(tmp / name, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again: swap, so one complete copy always exists
            old = root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        full = _disk_full(e)
        written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file()) if full and tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(_disk_full_message(run_dir, final, written)) from e
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); the previous "
                                  f"checkpoint is intact; free disk space or change output_root") from e
        raise
    try:
        _write_text_atomic(root / "latest", final.name + "\n")
    except OSError as e:
        raise CheckpointError(f"checkpoint {final} is complete but {root / 'latest'} could not be updated "
                              f"({e.strerror or e}) and still names the previous checkpoint; free disk space, "
                              f"then continue with resume={Path(run_dir)}") from e
    if keep_best and metric is not None and is_better(metric, _pointer_metric(run_dir, "best"), mode):
        _write_text_atomic(root / "best", final.name + "\n")
    _retain(run_dir, keep_last)
    return final, sha


def _pointer_metric(run_dir: Path, name: str) -> Optional[float]:
    target = read_pointer(run_dir, name)
    if target is None:
        return None
    return json.loads((target / META).read_text()).get("monitor_value")


def is_better(value: float, best: Optional[float], mode: str) -> bool:
    """NaN is never better, and any number beats a NaN best."""
    if value != value:
        return False
    if best is None or best != best:
        return True
    return value > best if mode == "max" else value < best


def _retain(run_dir: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(run_dir)
    keep = {p.name for p in ckpts[-keep_last:]}
    for name in ("latest", "best"):
        target = read_pointer(run_dir, name)
        if target is not None:
            keep.add(target.name)
    for p in ckpts:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for p in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*"), *root.glob(".badstep-*")]:  # left by a writer killed mid-save
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def read_meta(ckpt_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((Path(ckpt_dir) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {META} ({e}); pick another checkpoint") from e


def load(ckpt_dir: Path, map_location: Any = "cpu") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Verify the SHA256, then unpickle with weights_only=True (a checkpoint never executes code)."""
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / STATE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint not found: {state_path} does not exist; "
                              "pass a run directory, a checkpoints/step_* directory, or resume=latest")
    try:
        recorded = (ckpt_dir / DIGEST).read_text().split()[0]
    except (OSError, IndexError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable {DIGEST}; it is incomplete, resume from another") from e
    data = state_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise CheckpointError(f"checkpoint {ckpt_dir} failed its SHA256 check (recorded {recorded[:12]}, "
                              f"file {actual[:12]}): it is corrupt or was modified; resume from another checkpoint")
    meta = read_meta(ckpt_dir)
    if meta.get("sha256") not in (None, actual):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} records SHA256 {meta['sha256'][:12]} but the state "
                              f"file is {actual[:12]}; the checkpoint was tampered with")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's first line suggests weights_only=False, the one thing never to do with a forged file: show the
        # line that names what was refused instead (e.g. "unsupported GLOBAL posix.system")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "nsupported" in line), lines[0]).rstrip(".")
        raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded safely (weights_only): {why}; a trainrun "
                              "checkpoint holds only tensors and plain values, so this file was not written by "
                              "trainrun or was tampered with: do not load it with weights_only=False, resume from "
                              "another checkpoint") from e
    return state, meta


def run_dir_of(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir).resolve().parent.parent


def candidates(spec: str, output_root: Path, run_name: Optional[str] = None, key: str = "resume") -> List[Path]:
    """Checkpoint dirs a resume spec points to, best first (the newest valid one wins for run dirs)."""
    p = Path(spec)
    if spec == "latest":
        root = Path(output_root)
        if run_name:
            runs = [root / run_name]
        else:
            runs = sorted((d for d in root.glob("*") if (d / "checkpoints" / "latest").is_file()),
                          key=lambda d: (d / "checkpoints" / "latest").stat().st_mtime, reverse=True)[:1] \
                if root.is_dir() else []
        if not runs or not list_checkpoints(runs[0]):
            raise CheckpointError(f"{key}=latest: no run with checkpoints under {root}/; "
                                  f"pass the run directory explicitly ({key}=runs/NAME)")
        p = runs[0]
    if (p / STATE).is_file() or (p / META).is_file():
        return [p]
    if (p / "checkpoints").is_dir():
        ckpts = list_checkpoints(p)
        latest = read_pointer(p, "latest")
        ordered = ([latest] if latest else []) + [c for c in reversed(ckpts) if c != latest]
        if ordered:
            return ordered
    raise CheckpointError(f"{key}={spec}: no checkpoint there; pass a run directory, a checkpoints/step_* "
                          f"directory, or {key}=latest")


def is_latest(ckpt_dir: Path) -> bool:
    latest = read_pointer(run_dir_of(ckpt_dir), "latest")
    return latest is not None and latest.resolve() == Path(ckpt_dir).resolve()


def save_badstep(run_dir: Path, step: int, state: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """`checkpoints/step_N.badstep/`: the state at a step the NaN guard caught, for triage (`mode=eval resume=` it,
    or load it with `checkpoint.load`). Same files and SHA256 check as a checkpoint, but never a resume candidate:
    `latest`, `best` and retention ignore it."""
    root = Path(run_dir) / "checkpoints"
    scratch = root / f".badstep-{step}-{os.getpid()}"
    written, _ = save(scratch, step, state, meta, keep_last=1, keep_best=False)
    dest = root / f"{step_name(step)}.badstep"
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(written, dest)
    shutil.rmtree(scratch, ignore_errors=True)
    _fsync_dir(root)
    return dest
