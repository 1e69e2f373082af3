"""End-to-end tests through the CLI, the way users run trainrun."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, sha_of

SHORT = ["trainer.max_steps=30", "trainer.eval_every=10", "trainer.ckpt_every=10"]


def test_default_run_trains_and_writes_run_directory(cli):
    p = cli("run_name=default", "trainer.epochs=3")
    run = cli.dir / "runs" / "default"
    assert "trainrun: finished" in p.stdout and "val/acc" in p.stdout
    # layout: resolved config, hydra composition, metrics log, checkpoints with pointers
    for rel in ("config.yaml", "metrics.jsonl",
                "checkpoints/latest", "checkpoints/best"):
        assert (run / rel).is_file(), rel
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_000000066"  # 3 epochs x 22 steps of 64 on 1,438 digits
    meta = json.loads((latest / "meta.json").read_text())
    for key in ("config", "overrides", "seed", "git", "versions", "hardware", "data", "parent_sha256",
                "wall_time_s", "sha256", "command"):
        assert key in meta, key
    assert set(meta["config"]) == {"resolved", "unresolved"}
    assert meta["overrides"] == ["run_name=default", "trainer.epochs=3", "logger.progress=lines", "logger.log_every=5",
                                 "logger.plots=false"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["data"]["fingerprint"] and meta["hardware"]["hostname"]
    digest = hashlib.sha256((latest / "state.pt").read_bytes()).hexdigest()
    assert meta["sha256"] == digest == sha_of(run, 66)
    # parent chain: each checkpoint names the previous one's hash
    earlier = json.loads((run / "checkpoints" / "step_000000044" / "meta.json").read_text())
    assert meta["parent_sha256"] == earlier["sha256"]
    rows = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in rows if "val/acc" in r]
    assert [r["step"] for r in evals] == [22, 44, 66]
    assert evals[-1]["val/acc"] > 0.85  # a real model learning real digits in 3 epochs
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert {"lr", "samples_per_s", "grad_norm"} <= set(train_rows[0])


def test_same_seed_same_metrics_and_checkpoint_sha(cli):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cli(f"run_name={name}", f"seed={seed}", *SHORT)
    runs = cli.dir / "runs"

    def metrics(name):
        return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s", "peak_mem_mb")}
                for r in read_jsonl(runs / name / "metrics.jsonl")]

    assert metrics("a") == metrics("b")
    assert sha_of(runs / "a", 30) == sha_of(runs / "b", 30)
    assert sha_of(runs / "a", 30) != sha_of(runs / "c", 30)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kill_and_resume_is_bitwise_equal(cli, precision):
    common = [f"precision={precision}", "model=mlp", "trainer.max_steps=40", "trainer.ckpt_every=10",
              "trainer.eval_every=10"]
    cli("run_name=straight", *common)
    # stop mid-epoch (22 batches per epoch) at step 17, then resume into the same run directory
    p = cli("run_name=split", *common, "trainer.stop_at_step=17")
    assert "stopped at step 17/40" in p.stdout
    runs = cli.dir / "runs"
    p = cli("resume=runs/split", *common)
    assert "resumed from" in p.stdout and "at step 17 (epoch 0, batch 17)" in p.stdout
    assert "runs/split" in p.stdout.split("run dir:")[1].splitlines()[0]
    assert sha_of(runs / "straight", 40) == sha_of(runs / "split", 40)
    a = torch.load(runs / "straight/checkpoints/step_000000040/state.pt", weights_only=True)["model"]
    b = torch.load(runs / "split/checkpoints/step_000000040/state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed checkpoint records its lineage
    meta = json.loads((runs / "split/checkpoints/step_000000040/meta.json").read_text())
    assert meta["resumed_from"].endswith("step_000000017")
    # the metrics log has each step once
    steps = [r["step"] for r in read_jsonl(runs / "split/metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps))


def test_resume_latest_across_epoch_boundary_and_already_complete(cli):
    common = ["trainer.max_steps=30", "trainer.ckpt_every=5", "trainer.eval_every=15"]
    cli("run_name=r", *common, "trainer.stop_at_step=23")  # epoch 1, batch 1
    p = cli("resume=latest", *common)
    assert "at step 23 (epoch 1, batch 1)" in p.stdout
    cli("run_name=straight", *common)
    assert sha_of(cli.dir / "runs/r", 30) == sha_of(cli.dir / "runs/straight", 30)
    p = cli("resume=runs/r", *common)
    assert "already complete" in p.stdout


def test_resume_refuses_model_or_precision_change_and_warns_on_lr(cli):
    cli("run_name=base", "trainer.max_steps=10", "trainer.stop_at_step=5")
    before = sorted(str(p) for p in (cli.dir / "runs").rglob("*"))
    for bad in ("model=mlp", "precision=bf16", "model.channels=[16,32]"):
        p = cli("resume=runs/base", "trainer.max_steps=10", bad, check=False)
        assert p.returncode == 2
        assert "resume refused" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in (cli.dir / "runs").rglob("*")) == before  # nothing written
    p = cli("resume=runs/base", "trainer.max_steps=12", "optimizer.lr=0.01")
    log = p.stdout + p.stderr
    assert "optimizer.lr" in log and "trainer.max_steps" in log and "changed config" in log
    rows = read_jsonl(cli.dir / "runs/base/metrics.jsonl")
    assert rows[-1]["step"] == 12


def test_resume_needs_only_the_run_dir_the_checkpoint_brings_its_config(cli):
    """`trainrun resume=RUN` continues with the recipe and overrides the run was started with."""
    cli("+recipe=digits_mlp_fp32", "optimizer.lr=0.003", "trainer.max_steps=10", "run_name=whole")
    cli("+recipe=digits_mlp_fp32", "optimizer.lr=0.003", "trainer.max_steps=10", "trainer.stop_at_step=4",
        "run_name=cut")
    p = cli("resume=runs/cut")
    assert "changed config" not in p.stdout + p.stderr
    assert sha_of(cli.dir / "runs/cut", 10) == sha_of(cli.dir / "runs/whole", 10)


def test_branching_from_an_older_checkpoint_never_overwrites(cli):
    cli("run_name=base", "trainer.max_steps=20", "trainer.ckpt_every=5", "checkpoint.keep_last=10")
    old = sha_of(cli.dir / "runs/base", 20)
    p = cli("resume=runs/base/checkpoints/step_000000010", "trainer.max_steps=20", "optimizer.lr=0.003")
    branch = Path(p.stdout.split("run dir:")[1].split()[0])
    assert branch.name.startswith("base-from-step_000000010")
    assert sha_of(cli.dir / "runs/base", 20) == old
    assert sha_of(branch, 20) != old


@pytest.mark.parametrize("args, expected", [
    (["optimizer.lrr=0.1"], "unknown config key 'optimizer.lrr'"),
    (["+optimizer.lrr=0.1"], "unknown config key 'optimizer.lrr'"),
    (["optimizer.lr=abc"], "optimizer.lr"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be > 0"),
    (["optimizer=adamx"], "unknown option optimizer=adamx: choose one of adafactor, adagrad, adam, adamw, nadam"),
    (["+recipe=nope"], "unknown option recipe=nope"),
    (["resume=runs/missing"], "resume=runs/missing: no checkpoint there"),
    (["data=tensors", "data.root=missing.pt"], "not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, args, expected):
    p = cli(*args, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error:") and expected in lines[0], p.stderr
    # not even an empty run directory (a data error is found after Hydra made one)
    assert not (cli.dir / "runs").exists() or not any((cli.dir / "runs").iterdir())


def test_a_refused_run_keeps_a_run_directory_that_was_there_before(cli):
    """Only the empty directory the refused command itself created goes; an existing (even empty) one stays."""
    mine = cli.dir / "runs" / "mine"
    mine.mkdir(parents=True)
    os.utime(mine, (1_000_000_000, 1_000_000_000))
    p = cli("run_name=mine", "data=tensors", "data.root=missing.pt", check=False)
    assert p.returncode == 2 and "not found" in p.stderr
    assert mine.is_dir() and not any(mine.iterdir())


def test_labels_out_of_range_and_nan_data_fail_before_training(cli):
    x = torch.randn(64, 1, 4, 4)
    y = torch.arange(64) % 5
    torch.save({"x": x, "y": y}, cli.dir / "five.pt")
    p = cli("data=tensors", "data.root=five.pt", "data.num_classes=3", "data.batch_size=8", check=False)
    assert p.returncode == 2 and "labels out of range" in p.stderr and "step" not in p.stdout
    x[3, 0, 1, 1] = float("nan")
    torch.save({"x": x, "y": y}, cli.dir / "nan.pt")
    p = cli("data=tensors", "data.root=nan.pt", "data.batch_size=8", check=False)
    assert p.returncode == 2 and "NaN" in p.stderr and "[3]" in p.stderr


def test_tampered_checkpoint_is_refused_and_kept(cli):
    cli("run_name=t", "trainer.max_steps=10", "trainer.ckpt_every=5")
    state = cli.dir / "runs/t/checkpoints/step_000000010/state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    p = cli("resume=runs/t/checkpoints/step_000000010", "trainer.max_steps=10", check=False)
    assert p.returncode == 2 and "SHA256" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert state.read_bytes() == bytes(data)  # the evidence is not touched
    # resuming the run directory falls back to the newest valid checkpoint, with a warning
    p = cli("resume=runs/t", "trainer.max_steps=12")
    assert "step_000000005" in p.stdout and "skipped a bad checkpoint" in (p.stdout + p.stderr)


def test_gradient_accumulation_matches_the_big_batch(cli):
    common = ["model=mlp", "trainer.max_steps=8", "trainer.ckpt_every=8", "trainer.eval_every=8",
              "optimizer=sgd", "optimizer.lr=0.05"]
    cli("run_name=big", "data.batch_size=64", *common)
    cli("run_name=acc", "data.batch_size=16", "trainer.accumulation_steps=4", *common)
    a = torch.load(cli.dir / "runs/big/checkpoints/step_000000008/state.pt", weights_only=True)
    b = torch.load(cli.dir / "runs/acc/checkpoints/step_000000008/state.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["trainer"]["samples"] == b["trainer"]["samples"] == 8 * 64


def test_schedule_steps_per_optimizer_step_with_accumulation(cli):
    cli("run_name=s", "model=mlp", "data.batch_size=16", "trainer.accumulation_steps=4", "trainer.max_steps=20",
        "schedule=warmup_linear", "schedule.warmup_fraction=0.0", "schedule.warmup_steps=5",
        "optimizer.lr=0.01", "logger.log_every=1")
    rows = [r for r in read_jsonl(cli.dir / "runs/s/metrics.jsonl") if "lr" in r]
    for r in rows:  # the LR logged after step t is the one step t+1 will use
        t = r["step"]
        expected = 0.01 * (t / 5 if t < 5 else max(0.0, (20 - t) / 15))
        assert r["lr"] == pytest.approx(expected, abs=1e-12), t


def test_fp16_gradscaler_and_clipping_run(cli):
    p = cli("run_name=h", "model=mlp", "model.hidden_sizes=[32]", "precision=fp16", "trainer.max_steps=10",
            "regularization=standard", "logger.log_every=5")
    rows = [r for r in read_jsonl(cli.dir / "runs/h/metrics.jsonl") if "loss_scale" in r]
    assert rows and rows[0]["loss_scale"] == 65536.0
    st = torch.load(cli.dir / "runs/h/checkpoints/step_000000010/state.pt", weights_only=True)
    assert st["scaler"]["scale"] == 65536.0 and "trainer: finished" not in p.stderr


def test_retention_keeps_last_k_and_best(cli):
    cli("run_name=k", "trainer.max_steps=30", "trainer.ckpt_every=5", "trainer.eval_every=5",
        "checkpoint.keep_last=2", "checkpoint.monitor=val/loss", "checkpoint.monitor_mode=min")
    ck = cli.dir / "runs/k/checkpoints"
    kept = sorted(p.name for p in ck.iterdir() if p.is_dir())
    best = (ck / "best").read_text().strip()
    assert kept[-2:] == ["step_000000025", "step_000000030"] and best in kept
    assert len(kept) == (2 if best in kept[-2:] else 3)
    losses = {r["step"]: r["val/loss"] for r in read_jsonl(cli.dir / "runs/k/metrics.jsonl") if "val/loss" in r}
    assert int(best.split("_")[1]) == min(losses, key=losses.get)


def test_eval_mode_reports_the_checkpoint(cli):
    cli("run_name=e", "trainer.max_steps=20", "trainer.eval_every=20")
    p = cli("mode=eval", "resume=runs/e")
    val = [r for r in read_jsonl(cli.dir / "runs/e/metrics.jsonl") if "val/acc" in r][-1]["val/acc"]
    from trainrun.logging import _fmt

    assert _fmt(val) in p.stdout  # as the metrics table prints it
    assert (cli.dir / "runs/e/eval").is_dir()


def test_models_and_optimizers_compose_and_train(cli):
    for args in (["model=resnet18", "optimizer=sgd", "optimizer.nesterov=true", "schedule=step",
                  "schedule.step_size=1", "init=kaiming_normal", "init.zero_init_residual=true"],
                 ["model=mlp", "optimizer=adam", "schedule=multistep", "init=xavier_uniform",
                  "model.dropout=0.2", "regularization.clip_grad_value=1.0"]):
        p = cli(*args, "trainer.max_steps=2", "data.batch_size=16", "trainer.eval_every=2")
        assert "trainrun: finished" in p.stdout, args


def test_help_lists_groups_and_recipes(cli):
    p = cli("--help")
    for group in ("model:", "init:", "optimizer:", "schedule:", "precision:", "regularization:", "distillation:",
                  "data:", "logger:", "curriculum:", "finetune:", "task:", "cluster: slurm", "recipe: deit_tiny",
                  "digits_cnn, digits_mlp_fp32", "resnet50_bf16, resnet50_bf16_smoke"):
        assert group in p.stdout, group
    from conftest import run_cli
    p = run_cli(cli.dir, entry="recipes")
    assert "resnet50_bf16" in p.stdout and "80.858" in p.stdout


RECIPE_TEACHERS = {"mnist5k_student_kd": "mnist5k_teacher_cnn"}  # student recipe -> the recipe of its teacher
SMOKE = ["data=digits", "data.batch_size=16", "data.num_workers=0", "trainer.max_steps=2", "trainer.eval_every=2",
         "data.limit_val=64"]


# ImageNet recipes keep their whole data pipeline (policy, crop sizes, ra_reps) on a tiny ImageFolder of JPEGs at 32 px;
# fp32 and 2 ViT blocks here: bf16 autocast on a CPU without native bf16 made these 2 steps take minutes
IMAGE_RECIPES = ("resnet50_bf16", "resnet50_bf16_smoke", "deit_tiny")
LM_RECIPES = ("gpt_tiny_stdlib", "gpt_tiny_stdlib_cosine", "gpt_tiny_pydoc_lora")  # text data, not digits
LM_SMOKE = ["data.max_bytes=40000", "data.block_size=32", "data.batch_size=4", "trainer.max_steps=2",
            "trainer.eval_every=2", "data.limit_val=8", "model.layers=1", "model.width=32", "model.heads=2"]
IMAGE_SMOKE = ["data.batch_size=8", "data.num_workers=0", "trainer.max_steps=1", "trainer.eval_every=1",
               "data.limit_val=8", "data.image_size=32", "data.train_crop_size=32", "data.val_resize_size=36",
               "data.val_crop_size=32", "trainer.accumulation_steps=1", "precision=fp32"]


@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory):
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "make_imagefolder.py"
    spec = importlib.util.spec_from_file_location("make_imagefolder", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_imagefolder(tmp_path_factory.mktemp("jpegs") / "set", classes=3, per_class=8, size=40,
                                   val_per_class=3)["root"]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
def test_every_recipe_composes_and_trains_a_few_steps(cli, recipe, request):
    """Each recipe runs a few steps on digits (the ImageNet ones on tiny JPEGs), so no recipe can rot; its header
    states its evidence."""
    text = (Path(__file__).parents[1] / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Measured here" in text and "MEASURED" not in text
    if recipe in RECIPE_TEACHERS:
        cli(f"+recipe={RECIPE_TEACHERS[recipe]}", *SMOKE)
    small = ["model.small_input=true"] if "resnet" in recipe else []
    if recipe.startswith("digits100_") and recipe != "digits100_scratch":
        # fine-tuning recipes load another recipe's run; tests/test_compose_all.py builds them against one, and
        # tests/test_finetune_cli.py trains from loaded weights: here they run from random weights
        small = ["model.weights=null"]
    smoke = SMOKE
    if recipe in IMAGE_RECIPES:
        smoke = [f"data.root={request.getfixturevalue('tiny_jpegs')}", *IMAGE_SMOKE]
        small = ["model.layers=2"] if recipe == "deit_tiny" else []
    if recipe in LM_RECIPES:  # the LoRA recipe loads gpt_tiny_stdlib's run: here it adapts random weights
        smoke, small = LM_SMOKE, ["model.weights=null"] if "lora" in recipe else []
    p = cli(f"+recipe={recipe}", *smoke, *small)
    assert "trainrun: finished" in p.stdout
    run = Path(p.stdout.split("run dir:")[1].split()[0])
    cfg = (run / "config.yaml").read_text()
    if recipe == "resnet50_bf16":
        for line in ("name: resnet50", "lr: 0.5", "reference_batch_size: 1024", "label_smoothing: 0.1",
                     "weight_decay: 2.0e-05", "warmup_epochs: 5", "warmup_start_factor: 0.01", "ema_every: 32",
                     "ema_adjust: reference", "policy: trivialaugment", "ra_reps: 4"):
            assert line in cfg, line


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_sigterm_checkpoints_at_a_step_boundary_and_resume_matches(cli, sig):
    import signal
    import time

    from conftest import CliProcess

    common = ["model=mlp", "trainer.max_steps=3000", "trainer.ckpt_every=1000", "trainer.eval_every=1000",
              "logger.progress=lines", "logger.log_every=5"]
    proc = CliProcess(cli.dir, ["run_name=pre", *common])  # forked like cli's commands, signalled as a process
    metrics = cli.dir / "runs/pre/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), err  # a scheduler must not see success (#12 item 26)
    latest = (cli.dir / "runs/pre/checkpoints/latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    assert 0 < stopped < 3000 and f"stopped at step {stopped}/3000" in out
    end = stopped + 12  # both runs stop (checkpointed) 12 steps past the signal: the same 3000-step horizon, a
    cli("resume=runs/pre", *common, f"trainer.stop_at_step={end}")  # fraction of its cost
    cli("run_name=straight", *common, f"trainer.stop_at_step={end}")
    assert sha_of(cli.dir / "runs/pre", end) == sha_of(cli.dir / "runs/straight", end)
