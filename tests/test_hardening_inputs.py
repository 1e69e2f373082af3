"""Issue 12, bad input that escaped the one-line error, and the data / schedule fixes (items 13-17, 21-24, 30,
33, 36, 37). Each bad input must end in exactly one `trainrun: error:` line, exit 2, before any training."""
import hashlib
import io
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli, sha_of

STEPS = ["trainer.max_steps=6"]


def written(root: Path):
    """Files a refused command left under runs/ (the run-directory lock of a live process is not output)."""
    runs = root / "runs"
    return sorted(str(p.relative_to(root)) for p in runs.rglob("*") if p.is_file() and p.name != ".trainrun.lock") \
        if runs.exists() else []


def assert_refused(cli, p, *words):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("trainrun: error:"), p.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "train/loss" not in p.stdout  # no training happened
    assert written(cli.dir) == []
    return lines[0]


def save_tensors(path: Path, x, y):
    torch.save({"x": x, "y": y}, path)


def small_x(n=64, shape=(1, 4, 4)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


# ---- 13: one class --------------------------------------------------------------------------------------------

def test_num_classes_one_is_refused(cli):
    assert_refused(cli, cli("data.num_classes=1", *STEPS, check=False), "data.num_classes=1", "at least 2 classes")


def test_one_class_tensors_file_is_refused(cli):
    save_tensors(cli.dir / "one.pt", small_x(), torch.zeros(64, dtype=torch.long))
    p = cli("data=tensors", "data.root=one.pt", "model=mlp", *STEPS, check=False)
    assert_refused(cli, p, "single class", "data=tensors")


def _png(path: Path, seed: int, size: int = 8):
    from PIL import Image
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)


def test_one_class_imagefolder_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from trainrun.config import DataConfig
    from trainrun.data import build_split
    from trainrun.errors import DataError

    for i in range(6):
        _png(tmp_path / "imgs" / "cat" / f"{i}.png", i)
    cfg = OmegaConf.structured(DataConfig(name="imagefolder", root=str(tmp_path / "imgs"), image_size=8))
    with pytest.raises(DataError, match="single class"):
        build_split(cfg)


# ---- 14: absurd class counts ------------------------------------------------------------------------------------

def test_billion_classes_is_refused(cli):
    assert_refused(cli, cli("data.num_classes=1000000000", *STEPS, check=False), "data.num_classes=1000000000",
                   "100,000")


def test_label_of_a_billion_is_refused_before_allocating(cli):
    y = torch.arange(64) % 3
    y[5] = 10**9
    save_tensors(cli.dir / "big.pt", small_x(), y)
    p = cli("data=tensors", "data.root=big.pt", "model=mlp", *STEPS, check=False)
    assert_refused(cli, p, "1,000,000,000", "100,000")


# ---- 15: a model that cannot take the input ---------------------------------------------------------------------

def test_cnn_on_1x1_inputs_is_refused_in_one_line(cli):
    p = cli("data=synthetic", "data.input_shape=[1,1,1]", "model=cnn", *STEPS, check=False)
    line = assert_refused(cli, p, "model.name=cnn", "[1, 1, 1]", "Output size is too small")
    assert len(line) < 400


def test_forward_check_catches_a_head_of_the_wrong_size():
    import torch.nn as nn

    from trainrun.errors import ConfigError
    from trainrun.models import check_forward

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    check_forward(model, "mlp", (1, 4, 4), 3)
    assert model.training  # the check leaves the model in training mode
    with pytest.raises(ConfigError, match=r"returns \(1, 3\), not \[1, 5\]"):
        check_forward(model, "mlp", (1, 4, 4), 5)
    with pytest.raises(ConfigError, match="zero size"):
        check_forward(nn.Sequential(nn.Flatten(), nn.Linear(16, 0), nn.Linear(0, 3)), "mlp", (1, 4, 4), 3)


# ---- 16: seeds -------------------------------------------------------------------------------------------------

def test_seed_too_large_for_torch_is_refused(cli):
    assert_refused(cli, cli(f"seed={2**70}", *STEPS, check=False), f"seed={2**70}", "2**63")


def test_deleted_seed_is_refused(cli):
    assert_refused(cli, cli("~seed", *STEPS, check=False), "seed is missing", "~seed")


# ---- 17: broken image files ----------------------------------------------------------------------------------

def test_text_file_named_png_is_refused_when_indexed(cli):
    for c in ("a", "b"):
        for i in range(4):
            _png(cli.dir / "imgs" / c / f"{i}.png", i)
    (cli.dir / "imgs" / "b" / "notes.png").write_text("not an image\n")
    p = cli("data=imagefolder", "data.root=imgs", "data.image_size=8", "data.num_workers=0", "model=mlp",
            "data.batch_size=2", *STEPS, check=False)
    assert_refused(cli, p, "notes.png", "not a readable image")


def test_truncated_jpeg_mid_run_ends_in_one_line_and_keeps_the_checkpoint(cli):
    from PIL import Image
    import numpy as np

    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(4):
                _png(cli.dir / "imgs" / split / c / f"{i}.png", i)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    data = buf.getvalue()
    (cli.dir / "imgs" / "val" / "b" / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])  # header intact
    # the damaged file is only in val/: training runs, the first checkpoint is written, evaluation hits it;
    # two workers, so the error crosses a DataLoader worker
    p = cli("data=imagefolder", "data.root=imgs", "data.image_size=8", "data.num_workers=2", "model=mlp",
            "data.batch_size=2", "trainer.ckpt_every=1", "trainer.eval_every=2", "run_name=r", *STEPS, check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("trainrun: error: cannot decode image") and "cut.jpg" in lines[0], lines[0]
    run = cli.dir / "runs" / "r"
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("step_000000001")
    state = run / "checkpoints" / "step_000000001" / "state.pt"
    assert hashlib.sha256(state.read_bytes()).hexdigest() == sha_of(run, 1)


# ---- 21: zero-size inputs and layers -------------------------------------------------------------------------

def test_zero_width_hidden_layer_is_refused(cli):
    p = cli("model=mlp", "model.hidden_sizes=[0]", *STEPS, check=False)
    assert_refused(cli, p, "model.hidden_sizes=[0]", "> 0")


def test_zero_channel_tensors_are_refused(cli):
    save_tensors(cli.dir / "empty.pt", torch.randn(64, 0, 8, 8), torch.arange(64) % 3)
    p = cli("data=tensors", "data.root=empty.pt", "model=mlp", *STEPS, check=False)
    assert_refused(cli, p, "zero-size dimension", "(64, 0, 8, 8)")


# ---- 22: monitored metric names -------------------------------------------------------------------------------

def test_unknown_monitor_is_refused(cli):
    p = cli("checkpoint.monitor=val/typo", *STEPS, check=False)
    assert_refused(cli, p, "checkpoint.monitor='val/typo'", "val/loss, val/acc")


def test_monitor_names_are_what_evaluation_logs():
    from conftest import structured
    from omegaconf import OmegaConf

    from trainrun.config import TrainrunConfig, validate
    from trainrun.errors import ConfigError
    from trainrun.loop import eval_metric_names, evaluate
    from trainrun.data import BatchStream, TensorSet
    from trainrun.precision import PrecisionPolicy
    from trainrun.config import PrecisionConfig

    ds = TensorSet(torch.randn(8, 1, 2, 2), torch.arange(8) % 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    got = evaluate(model, BatchStream(ds, 4, 0, shuffle=False, drop_last=False),
                   PrecisionPolicy(structured(PrecisionConfig), torch.device("cpu")), torch.device("cpu"))
    assert set(got) == set(eval_metric_names(False))
    cfg = OmegaConf.structured(TrainrunConfig)
    cfg.checkpoint.monitor = "val_raw/acc"
    with pytest.raises(ConfigError, match="val_raw"):
        validate(cfg)
    cfg.regularization.ema_decay = 0.99
    validate(cfg)  # with EMA, evaluation also logs the raw weights' val_raw/*


# ---- 23: an explicit warmup key wins over the schedule option's default -----------------------------------------

def test_warmup_steps_on_the_default_schedule_is_used_and_a_long_warmup_warns(cli):
    p = cli("schedule.warmup_steps=10", "run_name=w", *STEPS)
    assert "10-step warmup, longer than the schedule's 6 steps" in p.stdout + p.stderr
    lrs = [r["lr"] for r in read_jsonl(cli.dir / "runs" / "w" / "metrics.jsonl") if "lr" in r]
    # logged at steps 5 and 6: the warmup is the named 10 steps, capped at the run's 6 (5% of 6 would be none)
    assert lrs == pytest.approx([1e-3 * 5 / 6, 1e-3])


def test_warmup_resolution():
    from conftest import structured

    from trainrun.config import ScheduleConfig
    from trainrun.schedule import resolve_warmup

    default = structured(ScheduleConfig, name="warmup_cosine", default_warmup_fraction=0.05)
    assert resolve_warmup(default, 1000, 10) == 50  # nothing named: the option's default
    default.warmup_fraction = 0.0
    assert resolve_warmup(default, 1000, 10) == 0  # an explicit 0 turns the default warmup off
    default.warmup_fraction, default.warmup_steps = None, 7
    assert resolve_warmup(default, 1000, 10) == 7


# ---- 24: complex labels -----------------------------------------------------------------------------------------

def test_complex_labels_are_refused(cli):
    save_tensors(cli.dir / "cplx.pt", small_x(), (torch.arange(64) % 3).to(torch.complex64))
    p = cli("data=tensors", "data.root=cplx.pt", "model=mlp", *STEPS, check=False)
    assert_refused(cli, p, "complex64", "int64")


# ---- 30: data.augment on in-memory tensor sets ----------------------------------------------------------------

def _digits_split(augment: bool):
    from omegaconf import OmegaConf

    from trainrun.config import DataConfig
    from trainrun.data import build_split

    return build_split(OmegaConf.structured(DataConfig(name="digits", augment=augment)))


def test_augment_on_digits_crops_without_flipping_and_is_seeded_per_sample():
    from trainrun.data import BatchStream

    plain, aug = _digits_split(False), _digits_split(True)
    assert "random crop" in aug.description and "flip" not in aug.description
    assert torch.equal(plain.train.x, aug.train.x)  # stored data untouched; augmentation is per batch

    def batch(ds, epoch, start=0):
        return next(BatchStream(ds, 64, 3, shuffle=True, drop_last=True).iter_epoch(epoch, start))

    xp, yp, ip = batch(plain.train, 0)
    xa, ya, ia = batch(aug.train, 0)
    assert torch.equal(ip, ia) and torch.equal(yp, ya) and not torch.equal(xp, xa)
    assert torch.equal(xa, batch(aug.train, 0)[0])  # a pure function of (seed, epoch, index)
    assert not torch.equal(batch(aug.train, 1)[0], batch(plain.train, 1)[0])
    # each augmented image is a shifted copy of the original: some crop offset of its edge-padded self matches
    pad = torch.nn.functional.pad(xp, (1, 1, 1, 1), mode="replicate")
    for k in range(8):
        assert any(torch.equal(xa[k], pad[k, :, i:i + 8, j:j + 8]) for i in range(3) for j in range(3))


def test_augment_on_tensors_flips_too(tmp_path):
    from omegaconf import OmegaConf

    from trainrun.config import DataConfig
    from trainrun.data import build_split

    save_tensors(tmp_path / "t.pt", small_x(shape=(3, 16, 16)), torch.arange(64) % 3)
    split = build_split(OmegaConf.structured(DataConfig(name="tensors", root=str(tmp_path / "t.pt"), augment=True)))
    assert "horizontal flip" in split.description


def test_augmented_digits_resume_exactly(cli):
    args = ["data.augment=true", "model=mlp", "trainer.max_steps=4", "trainer.ckpt_every=2"]
    cli(*args, "run_name=full")
    cli(*args, "run_name=cut", "trainer.stop_at_step=2")
    p = cli("resume=runs/cut", *args)
    assert "random crop" in p.stdout
    assert sha_of(cli.dir / "runs" / "full", 4) == sha_of(cli.dir / "runs" / "cut", 4)
    plain = run_cli(cli.dir, "model=mlp", "trainer.max_steps=4", "trainer.ckpt_every=2", "run_name=plain",
                    "logger.progress=lines", "logger.plots=false")
    assert plain.returncode == 0
    assert sha_of(cli.dir / "runs" / "plain", 4) != sha_of(cli.dir / "runs" / "full", 4)  # augment does something


def test_augment_on_synthetic_is_refused(cli):
    p = cli("data=synthetic", "data.augment=true", *STEPS, check=False)
    assert_refused(cli, p, "data.augment=True", "data=synthetic")


# ---- 33: the model listing prints what model= accepts ---------------------------------------------------------

def test_every_listed_model_option_composes():
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup
    from trainrun.config import validate
    from trainrun.models import model_options

    options = model_options(CONFIGS_DIR / "model")
    assert "vit_tiny" in options and "vit" not in options
    assert sorted(options) == sorted(p.stem for p in (CONFIGS_DIR / "model").glob("*.yaml"))
    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="t"):
        for name in options:
            validate(compose("config", overrides=[f"model={name}"]))


def test_trainrun_models_prints_the_option_names():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "from trainrun.cli import list_models_main; list_models_main()"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    names = set(re.findall(r"^│ (\w+)\s+│", p.stdout, re.M))
    assert names == {"cnn", "gpt", "hf_causal_lm", "mlp", "resnet18", "resnet50", "timm", "torchvision", "vit_tiny"}, \
        p.stdout


# ---- 36: extending a run says what happens to the LR curve ----------------------------------------------------

def test_extending_a_run_explains_the_lr_jump_and_the_pinned_horizon_keeps_the_curve(cli):
    cli("run_name=a", "trainer.max_steps=6", "schedule=warmup_linear", "model=mlp")
    p = cli("resume=runs/a", "trainer.max_steps=8")
    text = p.stdout + p.stderr
    m = re.search(r"LR at the resume step 6 goes from ([0-9.e-]+) \(the original curve\) to ([0-9.e-]+) \(it jumps "
                  r"back up\); to keep the original curve, resume with schedule.total_steps=6", text)
    assert m, text[-3000:]
    assert float(m.group(1)) == 0.0 and float(m.group(2)) == pytest.approx(1e-3 * 2 / 8, rel=1e-3)
    cli("run_name=b", "trainer.max_steps=6", "schedule=warmup_linear", "model=mlp")
    p = cli("resume=runs/b", "trainer.max_steps=8", "schedule.total_steps=6")
    assert "re-stretched" not in p.stdout + p.stderr
    lrs = [r["lr"] for r in read_jsonl(cli.dir / "runs" / "b" / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] == 0.0  # step 8, past the pinned horizon of 6, runs at the curve's end value


def test_horizon_change_is_silent_for_horizon_free_schedules():
    from conftest import structured

    from trainrun.config import ScheduleConfig
    from trainrun.schedule import Schedule, horizon_change

    cfg = structured(ScheduleConfig, name="constant")
    old, new = Schedule(cfg, 100, 10), Schedule(cfg, 200, 10)
    assert horizon_change(cfg, old.state_dict(), new, 10, 100, 1e-3) is None
    cfg = structured(ScheduleConfig, name="warmup_cosine")
    old, new = Schedule(cfg, 100, 10), Schedule(cfg, 200, 10)
    assert "schedule.total_steps=100" in horizon_change(cfg, old.state_dict(), new, 10, 100, 1e-3)


# ---- 37: trainer.threads ---------------------------------------------------------------------------------------

def test_threads_are_set_and_printed_in_the_header(cli):
    p = cli("trainer.threads=1", "model=mlp", "trainer.max_steps=2", "run_name=one")
    assert re.search(r"device: cpu, 1 CPU threads \|", p.stdout), p.stdout[-2000:]
    default = cli("model=mlp", "trainer.max_steps=2", "run_name=d")
    assert re.search(rf"device: cpu, {torch.get_num_threads()} CPU threads \|", default.stdout)
