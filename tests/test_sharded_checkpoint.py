"""checkpoint.format=sharded (FSDP2 shards via torch.distributed.checkpoint) on 2 gloo ranks, and mode=consolidate.

Three torchrun launches in all (module fixture): a sharded run stopped at step 3, its resume to step 6, and the
same run with checkpoint.format=full as the reference. Everything else runs in-process on their checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, sha_of
from trainrun import checkpoint, checkpoint_sharded
from trainrun.errors import CheckpointError, ConfigError

COMMON = ["trainer.parallel=fsdp2", "model=mlp", "model.dropout=0.1", "trainer.max_steps=6", "trainer.ckpt_every=3",
          "trainer.eval_every=3", "data.batch_size=16", "trainer.device=cpu"]


def torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainrun",
           *args, *COMMON, *FAST]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"torchrun {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    torchrun(root, "run_name=split", "checkpoint.format=sharded", "trainer.stop_at_step=3")
    resumed = torchrun(root, "resume=runs/split")  # adopts the checkpoint's config: format=sharded
    assert "resumed from" in resumed.stdout and "trainrun: finished" in resumed.stdout
    torchrun(root, "run_name=full")  # the reference: the same training, saved with checkpoint.format=full
    return root / "runs"


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / checkpoint.step_name(step)


def consolidate(ckpt: Path, out: Path) -> Path:
    from trainrun.modes.consolidate import consolidate_mode

    cfg = OmegaConf.create({"resume": str(ckpt), "output_root": str(ckpt.parent.parent.parent), "run_name": None})
    consolidate_mode(cfg, out, 0.0)
    return out


def test_each_rank_writes_its_shard_and_the_manifest_lists_every_file(runs):
    ckpt = step_dir(runs / "split", 6)
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "meta.json", "state.pt",
                     "state.pt.sha256"]
    manifest = checkpoint.digests(ckpt)
    assert sorted(manifest) == sorted(f for f in files if f != checkpoint.DIGEST)
    for name, sha in manifest.items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == sha
    meta = checkpoint.read_meta(ckpt)
    assert meta["format"] == "sharded" and meta["world_size"] == 2 and meta["sha256"] == manifest["state.pt"]
    rest = torch.load(ckpt / "state.pt", weights_only=True)
    assert "model" not in rest and "optimizer" not in rest and len(rest["rng_per_rank"]) == 2
    index = checkpoint_sharded.read_index(ckpt / "dcp")
    chunks = index.state_dict_metadata["model.1.weight"].chunks  # FSDP2 shards dim 0: half of the rows per rank
    assert [tuple(c.sizes) for c in chunks] == [(128, 64), (128, 64)]
    assert {tuple(c.offsets) for c in chunks} == {(0, 0), (128, 0)}


def test_stopped_and_resumed_sharded_run_consolidates_to_the_full_format_bytes(runs, tmp_path):
    """The consolidated state.pt of the sharded run (step 3: as saved; step 6: after a resume of it) has the SHA256
    of the state.pt that checkpoint.format=full writes for the uninterrupted run: same trajectory, bit for bit."""
    for step in (3, 6):
        out = consolidate(step_dir(runs / "split", step), tmp_path / f"c{step}")
        assert sha_of(out, step) == sha_of(runs / "full", step)
        meta = checkpoint.read_meta(step_dir(out, step))
        assert meta["config"]["resolved"]["checkpoint"]["format"] == "full" and "format" not in meta
        assert meta["consolidated_from"]["sha256"] == checkpoint.read_meta(step_dir(runs / "split", step))["sha256"]


def test_the_consolidated_checkpoint_serves_load_eval_and_a_one_process_resume(runs, tmp_path):
    import trainrun
    from test_inference import compose
    from trainrun.runner import run

    out = consolidate(step_dir(runs / "split", 6), tmp_path / "cons")
    loaded = trainrun.load(out)
    full = torch.load(step_dir(runs / "full", 6) / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in full.items())
    (tmp_path / "eval").mkdir()
    metrics = run(compose([*FAST, "mode=eval", f"resume={out}"]), tmp_path / "eval")
    assert metrics["val/acc"] == checkpoint.read_meta(step_dir(runs / "full", 6))["metrics"]["val/acc"]
    overrides = [*FAST, "trainer.device=cpu", f"resume={out}", "trainer.max_steps=8"]
    final = run(compose(overrides), out, overrides, compose([]))
    assert final["finished"] and final["step"] == 8
    assert checkpoint.read_meta(step_dir(out, 8))["config"]["resolved"]["checkpoint"]["format"] == "full"


def test_mode_consolidate_through_the_runner_writes_into_run_consolidate(runs, tmp_path):
    from test_inference import compose
    from trainrun.cli import _pick_run_dir
    from trainrun.runner import run

    run_dir = Path(_pick_run_dir("consolidate", str(runs / "split"), str(runs), None))
    assert run_dir.parent.name == "consolidate" and run_dir.parent.parent.resolve() == (runs / "split").resolve()
    try:
        run(compose([*FAST, "mode=consolidate", f"resume={runs / 'split'}"]), run_dir)
        assert sha_of(run_dir, 6) == sha_of(runs / "full", 6)
        with pytest.raises(ConfigError, match="already a single-file checkpoint"):
            run(compose([*FAST, "mode=consolidate", f"resume={run_dir}"]), tmp_path / "again")
        with pytest.raises(ConfigError, match="mode=consolidate needs the sharded checkpoint: resume="):
            run(compose([*FAST, "mode=consolidate"]), tmp_path / "none")
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def test_a_tampered_missing_or_extra_file_is_refused_before_load(runs, tmp_path):
    ckpt = _copy(step_dir(runs / "split", 6), tmp_path)
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"failed its SHA256 check: dcp/__1_0\.distcp"):
        checkpoint_sharded.load_full(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"missing dcp/__1_0\.distcp .*incomplete"):
        checkpoint_sharded.load_full(ckpt)
    shutil.copy(step_dir(runs / "split", 6) / "dcp" / "__1_0.distcp", shard)
    checkpoint_sharded.load_full(ckpt)  # restored: loads again
    (ckpt / "dcp" / "__2_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list"):
        checkpoint_sharded.load_full(ckpt)


def test_dcp_index_is_read_through_an_allow_list(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="cannot be read safely.*unsupported GLOBAL (posix|nt).system"):
        checkpoint_sharded.read_index(tmp_path / "dcp")


def test_readers_refuse_a_sharded_checkpoint_naming_consolidate(runs):
    import trainrun
    from trainrun.resume import load_resume

    ckpt = step_dir(runs / "split", 6)
    for load in (checkpoint.load, trainrun.load):
        with pytest.raises(CheckpointError, match=r"is sharded .*trainrun mode=consolidate resume="):
            load(ckpt)
    for mode, what in (("eval", "mode=eval"), ("train", "a one-process run")):
        cfg = OmegaConf.create({"mode": mode, "output_root": str(runs), "run_name": None})
        with pytest.raises(ConfigError, match=f"{what} needs a single-file checkpoint.*mode=consolidate"):
            load_resume(str(runs / "split"), cfg)


def test_format_sharded_needs_fsdp2_and_a_synchronous_save(tmp_path):
    cfg = OmegaConf.create({"mode": "train", "checkpoint": {"format": "sharded", "async_save": False}})
    with pytest.raises(ConfigError, match="this run is one process: launch it with torchrun and trainer.parallel"):
        checkpoint_sharded.check_run(cfg, "none")
    with pytest.raises(ConfigError, match="trainer.parallel=ddp"):
        checkpoint_sharded.check_run(cfg, "ddp")
    checkpoint_sharded.check_run(cfg, "fsdp2")
    cfg.checkpoint.async_save = True
    with pytest.raises(ConfigError, match="async_save=true with checkpoint.format=sharded"):
        checkpoint_sharded.check_run(cfg, "fsdp2")
    from test_inference import compose
    from trainrun.config import validate
    from trainrun.runner import run

    with pytest.raises(ConfigError, match="checkpoint.format"):
        validate(compose(["checkpoint.format=zarr"]))
    with pytest.raises(ConfigError, match="checkpoint.format=sharded .* this run is one process"):
        run(compose([*FAST, "trainer.device=cpu", "checkpoint.format=sharded", "trainer.max_steps=2"]), tmp_path)
    assert not list(tmp_path.iterdir())  # refused before the run directory is touched


def test_a_failed_write_on_any_rank_is_one_line_and_leaves_no_half_folder(tmp_path):
    import errno

    tmp = tmp_path / "checkpoints" / ".tmp-step_000000003-1"
    (tmp / "dcp").mkdir(parents=True)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "dcp" / "__0_0.distcp"))

    with pytest.raises(CheckpointError, match=r"sharded checkpoint .*step_000000003 not written: rank 0: No space "
                                              r"left on device .*the previous checkpoint is intact"):
        checkpoint_sharded._agree(disk_full, main=False, tmp=tmp)
    assert not tmp.exists()


def test_resume_ranks_split_the_verification_and_all_refuse_a_bad_shard(runs, tmp_path, monkeypatch):
    """Under torchrun each rank hashes every world-th shard file and the ranks exchange their verdicts: rank 0 of 2
    hashes .metadata and __1_0 itself and refuses __0_0 on rank 1's word (the exchange is faked here; the 2-rank
    runs of the fixture go through the real one)."""
    from trainrun import distributed

    ckpt = _copy(step_dir(runs / "split", 6), tmp_path)
    monkeypatch.setattr(distributed, "env_info", lambda: distributed.DistInfo(rank=0, world=2))
    verdicts = {}
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [mine, verdicts.get("rank 1")])
    state, meta = checkpoint_sharded.load_for_resume(ckpt, "train")
    assert state["model"]["1.weight"].shape == (256, 64) and state["model"]["1.weight"].is_meta
    shard = ckpt / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # rank 1's share: rank 0 alone does not look at it
    checkpoint_sharded.load_for_resume(ckpt, "train")
    verdicts["rank 1"] = "checkpoint X failed its SHA256 check: dcp/__0_0.distcp"
    with pytest.raises(CheckpointError, match=r"dcp/__0_0\.distcp"):
        checkpoint_sharded.load_for_resume(ckpt, "train")
