"""torchrun on CPU with gloo, 2 processes: DDP, FSDP2, exact resume, preemption, world-size change."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import read_jsonl, run_cli, sha_of

FAST = ["logger.progress=lines", "logger.log_every=5", "trainer.device=cpu"]


def torchrun(cwd, *args, nproc=2, check=True, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainrun", *args, *FAST]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def _state(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:09d}" / "state.pt", weights_only=True)


def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    # SGD: the update is linear in the gradient, so fp32 reduction-order differences stay at rounding level
    # (Adam divides by sqrt(v) and can blow a 1e-9 gradient difference up on near-zero gradients)
    common = ["model=mlp", "optimizer=sgd", "optimizer.lr=0.05", "trainer.max_steps=10", "trainer.eval_every=5",
              "trainer.ckpt_every=10"]
    p = torchrun(tmp_path, "run_name=ddp", "data.batch_size=16", *common)
    assert "global batch 32 (16 per rank x 2 ranks x 1 accumulation, ddp)" in p.stdout
    assert p.stdout.count("trainrun: finished") == 1  # rank 0 alone prints and logs
    run_cli(tmp_path, "run_name=single", "data.batch_size=32", *common, *FAST)
    a, b = _state(tmp_path / "runs/ddp", 10), _state(tmp_path / "runs/single", 10)
    assert set(a["model"]) == set(b["model"])  # no `module.` prefix in DDP checkpoints
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    la = [r["train/loss"] for r in read_jsonl(tmp_path / "runs/ddp/metrics.jsonl") if "train/loss" in r]
    lb = [r["train/loss"] for r in read_jsonl(tmp_path / "runs/single/metrics.jsonl") if "train/loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)
    assert len(a["rng_per_rank"]) == 2


def _fsdp2_checkpoint_holds_full_tensors_and_loads_in_one_process(cwd, run_name, step):
    st = _state(cwd / "runs" / run_name, step)
    assert st["model"]["1.weight"].shape == (256, 64)  # full tensors, not shards
    p = run_cli(cwd, "mode=eval", f"resume=runs/{run_name}", *FAST)
    val = [r for r in read_jsonl(cwd / f"runs/{run_name}/metrics.jsonl") if "val/acc" in r][-1]["val/acc"]
    from trainrun.logging import _fmt

    assert _fmt(val) in p.stdout  # as the metrics table prints it


def _resume_on_one_process_warns(cwd, run_name, common):
    """A copy of a run stopped on 2 ranks, resumed by one process: a world-size warning, and it finishes."""
    import shutil

    shutil.copytree(cwd / "runs" / run_name, cwd / "runs" / "one")
    p = run_cli(cwd, "resume=runs/one", *common, *FAST)
    out = p.stdout + p.stderr
    assert "world size" in out and "2 -> 1" in out and "trainrun: finished" in p.stdout


# Each torchrun launch costs ~20 s of process starts: the uninterrupted fsdp2 run is also the one whose checkpoint
# is checked for full tensors and evaluated in one process, and the stopped ddp run is also resumed on one process.
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_distributed_kill_and_resume_is_exact(tmp_path, parallel):
    common = [f"trainer.parallel={parallel}", "model=mlp", "model.dropout=0.1", "trainer.max_steps=20",
              "trainer.ckpt_every=5", "trainer.eval_every=10", "data.batch_size=16"]
    p = torchrun(tmp_path, "run_name=straight", *common)
    assert p.stdout.count("trainrun: finished") == 1
    if parallel == "fsdp2":
        _fsdp2_checkpoint_holds_full_tensors_and_loads_in_one_process(tmp_path, "straight", 20)
    torchrun(tmp_path, "run_name=split", *common, "trainer.stop_at_step=7")
    if parallel == "ddp":
        _resume_on_one_process_warns(tmp_path, "split", common)
    p = torchrun(tmp_path, "resume=runs/split", *common)
    assert "resumed from" in p.stdout
    assert sha_of(tmp_path / "runs/straight", 20) == sha_of(tmp_path / "runs/split", 20)


def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes(tmp_path):
    args = ["run_name=pre", "model=mlp", "trainer.max_steps=4000", "trainer.ckpt_every=2000",
            "trainer.eval_every=2000", "data.batch_size=16", *FAST]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "trainrun", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "runs/pre/metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    latest = (tmp_path / "runs/pre/checkpoints/latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    assert 0 < stopped < 4000, out + err
    st = _state(tmp_path / "runs/pre", stopped)
    assert len(st["rng_per_rank"]) == 2
    p = torchrun(tmp_path, "resume=runs/pre", *args[1:4], "trainer.max_steps=" + str(stopped + 5), *args[4:])
    assert f"at step {stopped}" in p.stdout and "trainrun: finished" in p.stdout


def test_slurm_launcher_config_composes(tmp_path):
    """SLURM itself cannot run here; the launcher config must compose with trainrun's config."""
    p = run_cli(tmp_path, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8", "trainer.parallel=fsdp2",
                "--cfg", "hydra")
    assert "SlurmLauncher" in p.stdout and "tasks_per_node: 8" in p.stdout and "nodes: 2" in p.stdout


def test_an_error_ends_every_rank_and_is_shown_once(tmp_path):
    p = torchrun(tmp_path, "optimizer.lr=-1", check=False)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("trainrun: error: optimizer.lr=-1.0: must be > 0") == 1
    x, y = torch.randn(64, 1, 4, 4), torch.arange(64) % 5  # fails inside the run, after the ranks have started
    torch.save({"x": x, "y": y}, tmp_path / "five.pt")
    p = torchrun(tmp_path, "data=tensors", "data.root=five.pt", "data.num_classes=3", "data.batch_size=8",
                 check=False)
    assert p.returncode != 0 and (p.stdout + p.stderr).count("labels out of range") == 1
