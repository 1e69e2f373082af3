"""Checkpoints: atomic save with SHA256, meta.json, retention, `latest`/`best` pointers, verified load.

Layout inside a run directory:
    checkpoints/step_000123/state.pt         torch.save of the state (weights_only-loadable)
    checkpoints/step_000123/state.pt.sha256  the folder's manifest: SHA256 of state.pt (computed while writing) and
                                             of meta.json, in `sha256sum -c` format
    checkpoints/step_000123/meta.json        provenance + the digest
    checkpoints/latest                       name of the newest complete checkpoint
    checkpoints/best                         name of the best checkpoint by the monitored metric

A checkpoint is written into a temporary folder, fsynced, then renamed into place; `latest` is
replaced (tmp + rename) only after that, so a crash at any point leaves the previous state intact.
A load verifies every file the manifest lists and refuses a folder holding any other file; a checkpoint written
before meta.json was listed (one line) still loads, with state.pt verified.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from trainrun import storage
from trainrun.errors import CheckpointError

STATE, DIGEST, META = "state.pt", "state.pt.sha256", "meta.json"
SHARDS = "dcp"  # checkpoint.format=sharded: the folder of torch.distributed.checkpoint files (checkpoint_sharded)
_SHARD_NAME = re.compile(SHARDS + r"/(\.metadata|__[0-9]+_[0-9]+\.distcp)")
RECORDS = ("test.json",)  # results about a checkpoint written after its save (mode=test): not part of its identity


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


_STEP_NAME = re.compile(r"step_[0-9]+")


def list_checkpoints(run_dir: Path) -> List[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
                   and (p / META).is_file()), key=lambda p: p.name)


def read_pointer(run_dir: Path, name: str) -> Optional[Path]:
    """The checkpoint `checkpoints/<name>` names, or None if the pointer is missing, dangling or not the name of a
    complete `step_*` folder in this same `checkpoints/` (a pointer is read from disk: untrusted)."""
    root = Path(run_dir) / "checkpoints"
    try:
        text = (root / name).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_NAME.fullmatch(text):
        return None
    target = root / text
    try:
        inside = target.resolve().parent == root.resolve()  # not a symlink into another run
    except OSError:
        return None
    return target if inside and (target / META).is_file() else None


def write_pointer(run_dir: Path, name: str, ckpt_dir: Path) -> None:
    """Point `checkpoints/<name>` (latest, best) at `ckpt_dir`, atomically."""
    _write_text_atomic(Path(run_dir) / "checkpoints" / name, Path(ckpt_dir).name + "\n")


def _disk_full(e: Optional[BaseException]) -> bool:
    """Whether `e` or an error behind it is ENOSPC/EDQUOT (torch.save turns the OSError into a RuntimeError)."""
    seen = []
    while e is not None and e not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.append(e)
        e = e.__cause__ or e.__context__
    return False


def _state_nbytes(obj: Any) -> int:
    """The bytes of the tensors in a state (what torch.save writes, less the small pickle around them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_nbytes(v) for v in obj)
    return 0


def _disk_full_message(run_dir: Path, final: Path, written: int) -> str:
    """One line: where, how much room a checkpoint needs (the state's size or the previous one's) and how much is
    free, the fix; a resume is offered only when there is a checkpoint to resume from."""
    prev = read_pointer(run_dir, "latest") or next(iter(list_checkpoints(run_dir)[-1:]), None)
    need = written
    try:
        need = max(need, sum(f.stat().st_size for f in prev.iterdir())) if prev is not None else need
        free = f"{shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    then = f"then continue with resume={Path(run_dir)}" if prev is not None else "then run the command again"
    kept = f"the previous checkpoint {prev.name} is intact" if prev is not None else "no checkpoint was written yet"
    return (f"disk full: no space left to write checkpoint {final} (a checkpoint needs about {need / 2**20:.1f} MiB, "
            f"{free}); {kept}; free disk space or set output_root to a larger disk, {then}")


def save(run_dir: Path, step: int, state: Dict[str, Any], meta: Dict[str, Any], *, keep_last: int,
         metric: Optional[float] = None, mode: str = "max", keep_best: bool = True,
         keep_every_n_steps: int = 0) -> Tuple[Path, str]:
    """Write checkpoint `step` atomically, update `latest` (and `best`), apply retention. Returns (dir, sha256)."""
    final, sha = write(run_dir, step, state, meta, metric)
    publish(run_dir, final, metric, mode=mode, keep_best=keep_best, keep_last=keep_last,
            keep_every_n_steps=keep_every_n_steps)
    return final, sha


def write(run_dir: Path, step: int, state: Dict[str, Any], meta: Dict[str, Any],
          metric: Optional[float] = None) -> Tuple[Path, str]:
    """The checkpoint folder `checkpoints/step_N`, complete and fsynced (written under a temporary name, then
    renamed); no pointer moves here. Returns (dir, sha256 of state.pt)."""
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
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
        manifest = f"{sha}  {STATE}\n{hashlib.sha256(meta_bytes).hexdigest()}  {META}\n".encode()
        for name, data in ((DIGEST, manifest), (META, meta_bytes)):
            with open(tmp / name, "wb") as f:
                f.write(data)
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
            raise CheckpointError(_disk_full_message(run_dir, final, max(written, _state_nbytes(state)))) from e
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); the previous "
                                  f"checkpoint is intact; free disk space or change output_root") from e
        raise
    return final, sha


def publish(run_dir: Path, final: Path, metric: Optional[float], *, mode: str, keep_best: bool, keep_last: int,
            keep_every_n_steps: int = 0) -> None:
    """After `write`: `latest` (and `best`) name the new checkpoint, then retention."""
    root = Path(run_dir) / "checkpoints"
    try:
        write_pointer(run_dir, "latest", final)
    except OSError as e:
        raise CheckpointError(f"checkpoint {final} is complete but {root / 'latest'} could not be updated "
                              f"({e.strerror or e}) and still names the previous checkpoint; free disk space, "
                              f"then continue with resume={Path(run_dir)}") from e
    if keep_best and metric is not None and is_better(metric, _pointer_metric(run_dir, "best"), mode):
        write_pointer(run_dir, "best", final)
    _retain(run_dir, keep_last, keep_every_n_steps)
    storage.upload(run_dir, final)  # a run on object storage: the checkpoint verified in the store, then its pointers


def _pointer_metric(run_dir: Path, name: str) -> Optional[float]:
    """The metric of the checkpoint a pointer names; None (any checkpoint beats it) if its meta.json is bad."""
    target = read_pointer(run_dir, name)
    if target is None:
        return None
    try:
        value = read_meta(target).get("monitor_value")
    except CheckpointError:
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_better(value: float, best: Optional[float], mode: str) -> bool:
    """NaN is never better, and any number beats a NaN best."""
    if value != value:
        return False
    if best is None or best != best:
        return True
    return value > best if mode == "max" else value < best


def _retain(run_dir: Path, keep_last: int, keep_every_n_steps: int = 0) -> None:
    """Delete the checkpoints nothing keeps: the newest `keep_last`, the pointers' targets (latest, best) and the
    milestones (a step that is a multiple of keep_every_n_steps) stay. A folder being written is not yet a
    `step_*` folder (it is `.tmp-...-PID`), so retention never sees it."""
    ckpts = list_checkpoints(run_dir)
    keep = {p.name for p in ckpts[-keep_last:]}
    if keep_every_n_steps > 0:
        keep.update(p.name for p in ckpts if int(p.name[5:]) % keep_every_n_steps == 0)
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


MAX_META_BYTES = 64 << 20  # meta.json is a few KiB; anything near this was not written by trainrun


def digests(ckpt_dir: Path) -> Dict[str, str]:
    """The manifest (file name -> SHA256) of a checkpoint folder, as recorded at save."""
    try:
        lines = (Path(ckpt_dir) / DIGEST).read_text().splitlines()
        out = {}
        for line in filter(str.strip, lines):
            sha, name = line.split()
            known = name in (STATE, META) or _SHARD_NAME.fullmatch(name) is not None
            if not known or name in out or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
                raise ValueError(line)
            out[name] = sha
        if STATE not in out:
            raise ValueError(f"no {STATE} line")
        return out
    except (OSError, ValueError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"bad line {str(e)[:80]!r}"
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable {DIGEST} ({why}); it is incomplete or was "
                              "edited, resume from another") from e


def verify(ckpt_dir: Path, name: str, data: bytes, manifest: Dict[str, str]) -> None:
    """Refuse `data` (the bytes of file `name`) unless it has the SHA256 the manifest records for it."""
    actual = hashlib.sha256(data).hexdigest()
    recorded = manifest.get(name, actual)  # a checkpoint older than the full manifest does not list meta.json
    if actual != recorded:
        raise CheckpointError(f"checkpoint {ckpt_dir} failed its SHA256 check: {name} (recorded {recorded[:12]}, "
                              f"file {actual[:12]}) is corrupt or was modified; resume from another checkpoint")


def read_meta(ckpt_dir: Path, manifest: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """meta.json, verified against the manifest, as plain data (a mapping); never resolved or executed."""
    path = Path(ckpt_dir) / META
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {META} ({e}); pick another checkpoint") from e
    verify(ckpt_dir, META, data, digests(ckpt_dir) if manifest is None else manifest)
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {META} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); pick another checkpoint") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} holds a {type(meta).__name__}, not a mapping; "
                              "pick another checkpoint")
    return meta


def load(ckpt_dir: Path, map_location: Any = "cpu") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Verify the SHA256, then unpickle with weights_only=True (a checkpoint never executes code)."""
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / STATE
    if (ckpt_dir / SHARDS).is_dir():  # the model and optimizer are in per-rank shards, not in state.pt
        from trainrun.checkpoint_sharded import refusal

        raise CheckpointError(refusal(ckpt_dir, "loading its weights in one process"))
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint not found: {state_path} does not exist; "
                              "pass a run directory, a checkpoints/step_* directory, or resume=latest")
    manifest = digests(ckpt_dir)
    if META in manifest:  # the whole folder is covered: a file nobody listed was put there after the save
        extra = sorted(p.name for p in ckpt_dir.iterdir() if p.name not in (STATE, DIGEST, META, *RECORDS))
        if extra:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds {extra[0]!r}, a file its {DIGEST} does not list: "
                                  "it was modified; resume from another checkpoint")
    data = state_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    verify(ckpt_dir, STATE, data, manifest)
    meta = read_meta(ckpt_dir, manifest)
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


def _newest_run(root: Path) -> Optional[Path]:
    """The run under `root` whose newest checkpoint was written last (pointers are not needed to find it)."""
    best, when = None, None
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        ckpts = list_checkpoints(d) if d.is_dir() else []
        if ckpts:
            t = (ckpts[-1] / META).stat().st_mtime
            if when is None or t > when:
                best, when = d, t
    return best


def candidates(spec: str, output_root, run_name: Optional[str] = None, key: str = "resume") -> List[Path]:
    """Checkpoint dirs a resume spec points to, best first. For a run directory: every complete checkpoint found
    by scanning `checkpoints/`, newest first, whatever `latest` says (it may be missing, stale or forged). A URL
    (s3://bucket/prefix/RUN) is first downloaded into its local staging copy (trainrun.storage.fetch)."""
    if storage.is_url(spec):
        spec = str(storage.fetch(spec, key))
    p = Path(spec)
    if spec == "latest":
        root = storage.local_root(output_root)
        newest = (root / run_name) if run_name else _newest_run(root)
        if newest is None or not list_checkpoints(newest):
            raise CheckpointError(f"{key}=latest: no run with checkpoints under {root}/; "
                                  f"pass the run directory explicitly ({key}=runs/NAME)")
        p = newest
    if (p / STATE).is_file() or (p / META).is_file():
        return [p]
    if (p / "checkpoints").is_dir():
        ordered = list(reversed(list_checkpoints(p)))
        if ordered:
            return ordered
    raise CheckpointError(f"{key}={spec}: no checkpoint there; pass a run directory, a checkpoints/step_* "
                          f"directory, or {key}=latest")


def is_latest(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` is the newest complete checkpoint of its run, by scanning (resuming it continues the run;
    resuming an older one branches)."""
    ckpts = list_checkpoints(run_dir_of(ckpt_dir))
    return bool(ckpts) and ckpts[-1].resolve() == Path(ckpt_dir).resolve()


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


# --- asynchronous save: a host-memory snapshot at the step boundary, written on a background thread -------------

_SNAPSHOT_LOCATIONS: Dict[int, str] = {}  # a snapshot storage's StorageImpl -> where its original lived


def _snapshot_location(storage) -> Optional[str]:
    """torch.save's location tagger for snapshot storages: the original's device ("cuda:0"), so an asynchronous
    save writes the same bytes as a synchronous one (torch.load maps the storage to its device as usual)."""
    return _SNAPSHOT_LOCATIONS.get(getattr(storage, "_cdata", None))


def _register_snapshot_tagger() -> None:
    if not any(tagger is _snapshot_location for _, tagger, _ in torch.serialization._package_registry):
        torch.serialization.register_package(0, _snapshot_location, lambda storage, location: None)


def snapshot(obj: Any, _memo: Optional[Dict[Any, Any]] = None) -> Any:
    """A host-memory copy of a state (training goes on mutating the live tensors in place) that torch.save writes
    byte for byte as it writes the state: each storage copied once with every tensor's offset, size and stride over
    it (views and shared storages stay shared), the original device recorded as the storage's location, and
    containers rebuilt as `canonical` rebuilds them. Immutable leaves are shared, other objects deep-copied."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        return _snapshot_tensor(obj, memo)
    if isinstance(obj, dict):
        return {k: snapshot(v, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v, memo) for v in obj)
    if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
        return obj
    import copy

    return copy.deepcopy(obj)


def _snapshot_tensor(t: torch.Tensor, memo: Dict[Any, Any]) -> torch.Tensor:
    if id(t) in memo:
        return memo[id(t)]
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_sparse or t.is_quantized or t.is_nested:
        out = t.detach().clone().cpu()  # layouts without one plain storage: a copy (bytes may differ from sync)
    else:
        storage = t.untyped_storage()
        key = ("storage", storage._cdata)
        copy = memo.get(key)
        if copy is None:
            location = torch.serialization.location_tag(storage)
            copy = storage.clone() if storage.device.type == "cpu" else storage.cpu()
            memo[key] = copy
            if location != "cpu":
                _register_snapshot_tagger()
                _SNAPSHOT_LOCATIONS[copy._cdata] = location
            memo.setdefault("storages", []).append(copy)
        out = torch.empty((), dtype=t.dtype).set_(copy, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)
    memo[id(t)] = out
    return out


def release_snapshot(state: Any) -> None:
    """Forget the locations recorded for a snapshot's storages once it has been written."""
    for storage in _storages(state):
        _SNAPSHOT_LOCATIONS.pop(storage._cdata, None)


def _storages(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj.untyped_storage()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _storages(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _storages(v)


class AsyncWriter:
    """At most one checkpoint write in flight, on a background thread.

    `submit(fn)` first waits for the write in flight (so a slow disk throttles the saves rather than queueing
    snapshots in memory), then runs `fn` on a new thread. `wait()` blocks until the write in flight is done and
    returns its result, or raises its error, on the caller's thread. The thread is a daemon: a process that dies
    (kill -9, or an exit that skips `wait`) abandons the write half-way, which leaves a `.tmp-` folder that the
    next save removes, and `latest` naming the previous complete checkpoint."""

    def __init__(self):
        self._thread = None
        self._outcome: Tuple[Any, Optional[BaseException]] = (None, None)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def submit(self, fn) -> Any:
        """Start `fn` in the background; returns the previous write's result (None if there was none)."""
        import threading

        previous = self.wait()

        def target():
            try:
                self._outcome = (fn(), None)
            except BaseException as e:  # noqa: BLE001  (re-raised on the training thread by wait)
                self._outcome = (None, e)

        self._thread = threading.Thread(target=target, name="trainrun-checkpoint", daemon=True)
        self._thread.start()
        return previous

    def wait(self) -> Any:
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        (result, error), self._outcome = self._outcome, (None, None)
        if error is not None:
            raise error
        return result


# --- space: what a run's checkpoints will take -------------------------------------------------------------------

def save_steps(total: int, ckpt_every: int, start: int = 0) -> List[int]:
    """The steps in (start, total] at which training saves: every ckpt_every-th, and the final one."""
    return sorted({*range((start // ckpt_every + 1) * ckpt_every, total + 1, ckpt_every), total} - set(range(start + 1)))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def space_plan(run_dir: Path, state_bytes: int, steps: List[int], *, keep_last: int, keep_best: bool,
               keep_every_n_steps: int) -> Tuple[str, bool]:
    """One line: a checkpoint's size, how many retention keeps at most (keep_last, best, the one being written,
    the milestones among `steps`), their total and the free space; and whether the total exceeds the free space.
    `state_bytes`: the measured byte size of the state (torch.save adds a few KiB of pickle)."""
    each = state_bytes + (64 << 10)
    at_once = min(keep_last + int(keep_best) + 1, len(steps) or 1)
    milestones = [s for s in steps if keep_every_n_steps > 0 and s % keep_every_n_steps == 0]
    total = each * (at_once + len(milestones))
    where = Path(run_dir)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    kept = f"at most {at_once} at once" + (f" + {len(milestones)} milestones" if keep_every_n_steps > 0 else "")
    line = (f"checkpoints: ~{_size(each)} each, {kept} = ~{_size(total)} in {where} "
            f"(disk free: {_size(free) if free is not None else 'unknown'})")
    return line, free is not None and total > free


def check(cfg) -> None:
    """Range checks of the checkpoint section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "checkpoint")
    checks.one_of("monitor_mode", ("max", "min"))
    checks.positive("keep_last")
    checks.one_of("format", ("full", "sharded"))
    checks.positive("keep_every_n_steps", allow_zero=True)  # 0: no milestones
