"""Sharded checkpoints (`checkpoint.format=sharded`, FSDP2 under torchrun): each rank writes its own shard of the
model and optimizer with torch.distributed.checkpoint (DCP); nothing is gathered to one rank.

Layout of `checkpoints/step_N/` (the same folder, pointers and retention as a full checkpoint):
    state.pt          everything else trainrun saves (trainer position, schedule, scaler, every rank's RNG, data
                      position, callbacks, ...), written by rank 0 as a full checkpoint writes it
    dcp/.metadata     DCP's index of the shards (rank 0)
    dcp/__R_0.distcp  rank R's shard of the model and optimizer state
    state.pt.sha256   the manifest: the SHA256 of every file above and of meta.json. Each rank hashes the shard
                      it wrote, rank 0 gathers the digests and writes the manifest; the folder is renamed into
                      place and `latest` moves only after that, so a reader never sees a half checkpoint.
    meta.json         provenance, with "format": "sharded"

A load verifies every file against the manifest first (the ranks split the shards between them and agree on the
outcome), then reads DCP's files without executing anything: the index is unpickled with an allow-list of DCP's
metadata classes, and non-tensor values (the optimizer's hyperparameters) with torch.load(weights_only=True) -
DCP's own reader would unpickle both freely. `trainrun mode=consolidate resume=RUN` turns a sharded checkpoint
into a full single-file one (state.pt) for one-process use: trainrun.load, mode=eval/test/predict/export, a resume.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from trainrun import checkpoint, distributed
from trainrun.checkpoint import DIGEST, META, SHARDS, STATE
from trainrun.errors import CheckpointError, ConfigError
from trainrun.usercode import sha256_of

SHARDED_PARTS = ("model", "optimizer")  # the Run parts DCP writes; every other part goes to state.pt
_SHARD_FILE = re.compile(r"__([0-9]+)_[0-9]+\.distcp")
_METADATA = ".metadata"


def consolidate_hint(ckpt_dir: Path) -> str:
    return f"make a single-file copy with `trainrun mode=consolidate resume={ckpt_dir}` and use that"


def check_run(cfg, parallel: str) -> None:
    """format=sharded needs FSDP2 under torchrun (the shards are FSDP2's) and a synchronous save (refused in one
    line before any compute)."""
    if cfg.checkpoint.format != "sharded" or cfg.mode != "train":
        return
    if parallel != "fsdp2":
        where = "this run is one process" if parallel == "none" else f"this run uses trainer.parallel={parallel}"
        raise ConfigError(f"checkpoint.format=sharded writes each rank's FSDP2 shard, but {where}: launch it with "
                          "torchrun and trainer.parallel=fsdp2, or use checkpoint.format=full")
    if cfg.checkpoint.get("async_save"):
        raise ConfigError("checkpoint.async_save=true with checkpoint.format=sharded: a sharded save is "
                          "synchronous (every rank writes its own shard); set checkpoint.async_save=false or "
                          "checkpoint.format=full")


# --- save --------------------------------------------------------------------------------------------------------

def save(run, step: int, meta: Dict[str, Any], *, metric: Optional[float], keep_last: int, mode: str = "max",
         keep_best: bool = True, keep_every_n_steps: int = 0) -> Tuple[Optional[Path], Optional[str]]:
    """Write checkpoint `step` on every rank (a collective). Returns (dir, sha256 of state.pt) on rank 0, (None,
    None) elsewhere. A failure on any rank is one CheckpointError on every rank, and the previous checkpoint stays
    `latest`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    info = run.info
    rest = {name: part.save() for name, part in run.parts.items() if name not in SHARDED_PARTS}
    model_sd, optim_sd = distributed.sharded_state(run.net, run.optimizer)
    root = Path(run.dir) / "checkpoints"
    final = root / checkpoint.step_name(step)
    tmp = Path(distributed.broadcast_object(str(root / f".tmp-{final.name}-{os.getpid()}")))
    _agree(_fresh_folder, tmp, main=True, tmp=tmp)
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd},
                 storage_writer=FileSystemWriter(tmp / SHARDS, single_file_per_rank=True, sync_files=True,
                                                 thread_count=1))
    except Exception as e:  # DCP gathers every rank's failure and raises it on every rank
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"could not write sharded checkpoint {final} ({why}); the previous checkpoint is "
                              "intact; free disk space or change output_root") from e
    digests = _agree(_hash_own_files, tmp / SHARDS, info.rank, main=False, tmp=tmp)
    shards = {f"{SHARDS}/{name}": sha for rank_digests in digests for name, sha in rank_digests.items()}
    sha = _agree(_complete, tmp, final, step, rest, meta, shards, metric, main=True, tmp=tmp)[0]
    if not info.is_main:
        return None, None
    checkpoint.publish(run.dir, final, metric, mode=mode, keep_best=keep_best, keep_last=keep_last,
                       keep_every_n_steps=keep_every_n_steps)
    return final, sha


def _agree(fn, *args, main: bool, tmp: Path):
    """Run `fn(*args)` (on rank 0 only when `main`), then every rank learns every rank's outcome: a failure
    anywhere raises the same one-line error on every rank (no rank is left waiting in a collective) and rank 0
    removes the unfinished folder `tmp`. Returns the list of the ranks' results."""
    result, error = None, None
    if not main or distributed.env_info().is_main:
        try:
            result = fn(*args)
        except (OSError, CheckpointError) as e:
            error = str(e) if isinstance(e, CheckpointError) else f"{e.strerror or e} ({getattr(e, 'filename', '')})"
    outcomes = distributed.all_gather_object((result, error))
    failed = [f"rank {rank}: {err}" for rank, (_, err) in enumerate(outcomes) if err]
    if failed:
        if distributed.env_info().is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"sharded checkpoint {tmp.parent / tmp.name.split('-')[1]} not written: {failed[0]}; "
                              "the previous checkpoint is intact; free disk space or change output_root")
    return [res for res, _ in outcomes]


def _complete(tmp: Path, final: Path, step: int, rest: Dict[str, Any], meta: Dict[str, Any],
              shards: Dict[str, str], metric: Optional[float]) -> str:
    """Rank 0, once every shard is written and hashed: the rest of the state, meta.json and the manifest, then the
    folder renamed into place. Returns state.pt's SHA256."""
    sha = _write_rest(tmp, step, rest, {**meta, "format": "sharded"}, shards, metric)
    _rename_into_place(tmp, final)
    return sha


def _fresh_folder(tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _hash_own_files(folder: Path, rank: int) -> Dict[str, str]:
    """The SHA256 of each file this rank wrote (its shards; rank 0 also DCP's index)."""
    mine = {}
    for path in sorted(folder.iterdir()):
        match = _SHARD_FILE.fullmatch(path.name)
        if (match and int(match.group(1)) == rank) or (path.name == _METADATA and rank == 0):
            mine[path.name] = sha256_of(path)
    return mine


def _write_rest(tmp: Path, step: int, rest: Dict[str, Any], meta: Dict[str, Any], shards: Dict[str, str],
                metric: Optional[float]) -> str:
    """state.pt, meta.json and the manifest into `tmp`, each fsynced (rank 0). Returns state.pt's SHA256."""
    listed = sorted(p.name for p in (tmp / SHARDS).iterdir())
    unlisted = [name for name in listed if f"{SHARDS}/{name}" not in shards]
    if unlisted or _METADATA not in listed:
        raise CheckpointError(f"sharded checkpoint {tmp}: {SHARDS}/{(unlisted or [_METADATA])[0]} was not "
                              "hashed by the rank that wrote it; the previous checkpoint is intact")
    with open(tmp / STATE, "wb") as f:
        writer = checkpoint._HashingWriter(f)
        checkpoint._save_uncrc(checkpoint.canonical(rest), writer)
        f.flush()
        os.fsync(f.fileno())
    sha = writer.h.hexdigest()
    shard_bytes = sum((tmp / SHARDS / name).stat().st_size for name in listed)
    meta = {**meta, "step": step, "sha256": sha, "state_bytes": writer.n + shard_bytes}  # the whole state's size
    if metric is not None:
        meta["monitor_value"] = metric
    meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
    lines = [f"{sha}  {STATE}", f"{hashlib.sha256(meta_bytes).hexdigest()}  {META}",
             *(f"{digest}  {name}" for name, digest in sorted(shards.items()))]
    for name, data in ((DIGEST, ("\n".join(lines) + "\n").encode()), (META, meta_bytes)):
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    checkpoint._fsync_dir(tmp / SHARDS)
    checkpoint._fsync_dir(tmp)
    return sha


def _rename_into_place(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():  # the same step saved again: swap, so one complete copy always exists
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    checkpoint._fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading DCP's files without executing anything ---------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    """DCP's .metadata holds dataclasses of shapes, dtypes and file offsets: only those classes are allowed."""

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                 torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            return read_index(Path(self.path), load_id=self.load_id)

    return SafeReader(folder)


def read_index(folder: Path, load_id: Optional[str] = None):
    """DCP's index (.metadata) of a verified shard folder, through the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        with open(folder / _METADATA, "rb") as f:
            index = _IndexUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder.parent}: {SHARDS}/{_METADATA} cannot be read safely ({e}); it was "
                              "not written by trainrun or was tampered with: resume from another checkpoint") from e
    if not isinstance(index, Metadata):
        raise CheckpointError(f"checkpoint {folder.parent}: {SHARDS}/{_METADATA} holds a {type(index).__name__}, not "
                              "DCP's index; resume from another checkpoint")
    index.storage_meta = index.storage_meta or StorageMeta()
    index.storage_meta.load_id = load_id
    return index


def _safe_load_bytes(planner, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with weights_only=True: the values are plain numbers, strings and lists."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


def _planner(empty: bool = False):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner
    return type("SafeLoadPlanner", (base,), {"load_bytes": _safe_load_bytes})()


# --- verify and load ----------------------------------------------------------------------------------------------

def is_sharded(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / SHARDS).is_dir()


def refusal(ckpt_dir: Path, what: str) -> str:
    """The one line for a reader that cannot use a sharded checkpoint."""
    meta_world = ""
    try:
        meta_world = f", written by {checkpoint.read_meta(ckpt_dir).get('world_size')} FSDP2 ranks"
    except CheckpointError:
        pass
    return (f"checkpoint {ckpt_dir} is sharded (checkpoint.format=sharded{meta_world}): {what} needs a single-file "
            f"checkpoint; {consolidate_hint(ckpt_dir)}, or resume training under torchrun with "
            "trainer.parallel=fsdp2")


def verify_files(ckpt_dir: Path, manifest: Dict[str, str], part: int = 0, parts: int = 1) -> None:
    """Refuse a folder whose files are not exactly the manifest's, or whose shard files (every `parts`-th from
    `part`: the ranks share the reading) do not have their recorded SHA256."""
    ckpt_dir = Path(ckpt_dir)
    listed = sorted(name for name in manifest if name.startswith(f"{SHARDS}/"))
    present = sorted(f"{SHARDS}/{p.name}" for p in (ckpt_dir / SHARDS).iterdir())
    missing = [name for name in listed if name not in present]
    if missing or not listed:
        raise CheckpointError(f"checkpoint {ckpt_dir} is missing {missing[0] if missing else 'its shard list'} "
                              f"(listed in its {DIGEST}): it is incomplete; resume from another checkpoint")
    extra = [name for name in present if name not in listed]
    extra += sorted(p.name for p in ckpt_dir.iterdir()
                    if p.name not in (STATE, DIGEST, META, SHARDS, *checkpoint.RECORDS))
    if extra:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds {extra[0]!r}, a file its {DIGEST} does not list: it was "
                              "modified; resume from another checkpoint")
    for name in listed[part::parts]:
        actual = sha256_of(ckpt_dir / name)
        if actual != manifest[name]:
            raise CheckpointError(f"checkpoint {ckpt_dir} failed its SHA256 check: {name} (recorded "
                                  f"{manifest[name][:12]}, file {actual[:12]}) is corrupt or was modified; resume "
                                  "from another checkpoint")


def load_rest(ckpt_dir: Path, manifest: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """state.pt (all but the model and optimizer) and meta.json, each verified, state.pt unpickled weights_only."""
    data = (Path(ckpt_dir) / STATE).read_bytes()
    checkpoint.verify(ckpt_dir, STATE, data, manifest)
    meta = checkpoint.read_meta(ckpt_dir, manifest)
    if meta.get("sha256") != manifest[STATE] or meta.get("format") != "sharded":
        raise CheckpointError(f"checkpoint {ckpt_dir}: its {META} does not describe this sharded checkpoint "
                              f"(sha256, format); it was tampered with; resume from another checkpoint")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (as checkpoint.load: the line that names what was refused)
        raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded safely (weights_only): "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}; resume from another "
                              "checkpoint") from e
    if not isinstance(state, dict) or any(name in state for name in SHARDED_PARTS):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {STATE} is not the rest of a sharded checkpoint; resume from "
                              "another checkpoint")
    return state, meta


def load_for_resume(ckpt_dir: Path, mode: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A training resume under torchrun (a collective): every file verified (the ranks split the shards and agree
    on the outcome), then state.pt; the model entry holds the shards' shapes as meta tensors, so the resume's
    checks compare them with the model this config builds. The shards themselves are read by `restore`."""
    info = distributed.env_info()
    if mode != "train":  # ConfigError: no other checkpoint of the run is tried instead
        raise ConfigError(refusal(ckpt_dir, f"mode={mode}"))
    if not info.enabled:
        raise ConfigError(refusal(ckpt_dir, "a one-process run"))
    error = None
    try:
        manifest = checkpoint.digests(ckpt_dir)
        verify_files(ckpt_dir, manifest, info.rank, info.world)
    except (CheckpointError, OSError) as e:
        error = str(e) if isinstance(e, CheckpointError) else f"checkpoint {ckpt_dir}: {e}; resume from another"
    errors = [e for e in distributed.all_gather_object(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    state, meta = load_rest(ckpt_dir, manifest)
    index = read_index(Path(ckpt_dir) / SHARDS)
    state["model"] = _model_shapes(index)
    return state, meta


def _model_shapes(index) -> Dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shapes = {}
    for key, entry in index.state_dict_metadata.items():
        path = (index.planner_data or {}).get(key, ())
        if len(path) == 2 and path[0] == "model" and isinstance(entry, TensorStorageMetadata):
            shapes[path[1]] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="meta")
    return shapes


def restore(run) -> None:
    """Load the shards into the built FSDP2 model and optimizer (every rank reads what its shard needs; DCP
    reshards when the world size changed)."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = run.resumed.dir
    if run.parallel != "fsdp2":
        raise ConfigError(f"resume={ckpt_dir}: a sharded checkpoint resumes under trainer.parallel=fsdp2 (this run "
                          f"uses {run.parallel}); resume with trainer.parallel=fsdp2, or "
                          f"{consolidate_hint(ckpt_dir)}")
    model_sd, optim_sd = distributed.sharded_state(run.net, run.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, storage_reader=_reader(Path(ckpt_dir) / SHARDS), planner=_planner())
    except Exception as e:  # DCP raises one CheckpointException on every rank
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"resume refused: checkpoint {ckpt_dir}: its shards do not fit the model and "
                              f"optimizer this config builds ({why}); resume with the checkpoint's settings or "
                              "start a new run") from e
    distributed.load_sharded_state(run.net, run.optimizer, state["model"], state["optimizer"])


def load_full(ckpt_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The whole state of a sharded checkpoint in one process (mode=consolidate): every file verified, the shards
    assembled into full tensors, in the order a full checkpoint stores them (model, optimizer, then the rest)."""
    # what format_utils.dcp_to_torch_save does, with the safe reader and planner (it unpickles freely)
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    manifest = checkpoint.digests(ckpt_dir)
    verify_files(ckpt_dir, manifest)
    rest, meta = load_rest(ckpt_dir, manifest)
    full: Dict[str, Any] = {}
    try:
        _load_state_dict(full, storage_reader=_reader(Path(ckpt_dir) / SHARDS), planner=_planner(empty=True),
                         no_dist=True)
    except Exception as e:  # noqa: BLE001
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"checkpoint {ckpt_dir}: its shards cannot be assembled ({why})") from e
    if set(full) != set(SHARDED_PARTS):
        raise CheckpointError(f"checkpoint {ckpt_dir}: its shards hold {sorted(full)}, not the model and optimizer")
    full = _in_saved_order(full, read_index(Path(ckpt_dir) / SHARDS))
    return {**{name: full[name] for name in SHARDED_PARTS}, **rest}, meta


def _in_saved_order(full: Dict[str, Any], index) -> Dict[str, Any]:
    """The assembled state with every mapping in the order the saved state had (DCP's index lists the tensors of
    DTensors first; its flattening map keeps the original order), so the consolidated state.pt has the bytes that
    checkpoint.format=full writes for the same state (an optimizer's per-parameter `step` comes first)."""
    from torch.distributed.checkpoint._traverse import set_element

    ordered: Dict[str, Any] = {}
    for path in (index.planner_data or {}).values():
        value = full
        for key in path:
            value = value[key]
        set_element(ordered, path, value)
    return ordered
