"""mode=consolidate: a sharded checkpoint (checkpoint.format=sharded) as a full single-file checkpoint.

`trainrun mode=consolidate resume=RUN` (or resume=RUN/checkpoints/step_N) reads the shards in one process (every
file SHA256-verified first, nothing unpickled beyond tensors and plain values) and writes RUN/consolidate/<time>/,
a run directory whose checkpoint is what checkpoint.format=full would have written: state.pt with the full model
and optimizer state and everything else the sharded checkpoint holds, meta.json and the manifest. trainrun.load,
mode=eval/test/predict/export and a one-process resume (resume=RUN/consolidate/<time>) use it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

from trainrun import checkpoint, checkpoint_sharded, distributed
from trainrun.errors import ConfigError


def consolidate_mode(cfg, run_dir: Path, t0: float) -> Dict[str, Any]:
    if distributed.env_info().enabled:
        raise ConfigError("mode=consolidate runs in one process (it reads every shard itself): run it without "
                          "torchrun")
    if not cfg.resume:
        raise ConfigError("mode=consolidate needs the sharded checkpoint: resume=<run dir or checkpoints/step_* dir>")
    source = checkpoint.candidates(cfg.resume, Path(cfg.output_root), cfg.run_name)[0]
    if not checkpoint_sharded.is_sharded(source):
        raise ConfigError(f"resume={cfg.resume}: checkpoint {source} is already a single-file checkpoint "
                          "(checkpoint.format=full); use it as it is")
    state, meta = checkpoint_sharded.load_full(source)
    stored = meta["config"]["resolved"].get("checkpoint") or {}
    path, sha = checkpoint.save(run_dir, meta["step"], state, full_meta(meta, source, run_dir), keep_last=1,
                                metric=meta.get("monitor_value"), mode=stored.get("monitor_mode", "max"))
    size = (path / checkpoint.STATE).stat().st_size / 2**20
    print(f"consolidated {source} (step {meta['step']}, {meta.get('world_size')} FSDP2 ranks) -> {path} "
          f"({checkpoint.STATE} {size:.2f} MiB, sha256 {sha[:12]}); use it with trainrun.load('{run_dir}'), "
          f"mode=eval resume={run_dir}, or continue training in one process with resume={run_dir}", flush=True)
    return {"step": meta["step"], "finished": True}


def full_meta(meta: Dict[str, Any], source: Path, run_dir: Path) -> Dict[str, Any]:
    """The sharded checkpoint's meta.json as a full checkpoint's: its config says checkpoint.format=full (so a
    resume of the copy writes full checkpoints), where it came from is recorded, and the digests are recomputed
    by checkpoint.save."""
    out = copy.deepcopy(meta)
    for key in ("format", "sha256", "state_bytes", "monitor_value"):
        out.pop(key, None)
    for view in ("resolved", "unresolved"):
        section = out["config"].get(view, {}).get("checkpoint")
        if isinstance(section, dict):
            section["format"] = "full"
    out["run_dir"] = str(Path(run_dir).resolve())
    out["consolidated_from"] = {"checkpoint": str(Path(source).resolve()), "sha256": meta["sha256"],
                                "world_size": meta.get("world_size")}
    return out
