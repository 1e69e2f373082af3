"""The held-out test split (data.test_fraction, CIFAR-10's test set, an imagefolder test/, a user factory's "test"),
class names, mode=test, and the sweep summary's test metric of the job the validation metric selects."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import read_jsonl, run_cli, sha_of
from trainrun import checkpoint
from trainrun.config import DataConfig
from trainrun.data import build_split, split_indices
from trainrun.errors import ConfigError, DataError

FAST = ["logger.progress=lines", "logger.plots=false"]


def data_cfg(**values):
    cfg = OmegaConf.structured(DataConfig)
    OmegaConf.set_struct(cfg, "_target_" not in values)  # a user factory's node carries its own arguments
    for k, v in values.items():
        cfg[k] = v
    return cfg


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="test_split"):
        return hydra_compose("config", overrides=list(overrides))


def numbered_tensors(path: Path, n: int = 400, classes: int = 4, seed: int = 0) -> Path:
    """A learnable tensors file whose sample i is recognisable: x[i, 0, 0, 0] = i / 1000."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(classes, 1, 8, 8, generator=g)[y] + torch.randn(n, 1, 8, 8, generator=g)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / 1000
    torch.save({"x": x, "y": y}, path)
    return path


def sample_ids(ds) -> set:
    return {int(round(float(v) * 1000)) for v in ds.x[:, 0, 0, 0]}


# --- the split ---------------------------------------------------------------------------------------------------

def test_without_a_test_fraction_the_split_is_byte_identical_to_the_one_before_test_splits():
    # fingerprints of the default digits and synthetic splits as computed before test splits existed (commit 7876d07)
    digits, synthetic = build_split(data_cfg()), build_split(data_cfg(name="synthetic"))
    assert digits.fingerprint == "011e6b9514d6bea384d27f71c560f05aafd0dad48f4403d1e390b50468cc6e43"
    assert synthetic.fingerprint == "06f1de2849699b8c4b94e8c5865c6d127b478e2147837469506e759a09af70da"
    assert digits.test is None and digits.description == "digits: 1438 train / 359 val, 10 classes, input (1, 8, 8)"


def test_the_test_split_is_disjoint_and_does_not_move_with_split_seed_or_val_fraction(tmp_path):
    path = numbered_tensors(tmp_path / "d.pt")
    base = build_split(data_cfg(name="tensors", root=str(path), test_fraction=0.2))
    test = sample_ids(base.test)
    assert len(test) == 80 and len(base.val) == 80 and len(base.train) == 240  # val_fraction is of all samples
    assert not test & sample_ids(base.train) and not test & sample_ids(base.val)
    assert test | sample_ids(base.train) | sample_ids(base.val) == set(range(400))
    for change in ({"split_seed": 7}, {"val_fraction": 0.35}, {"split_seed": 3, "val_fraction": 0.1}):
        other = build_split(data_cfg(name="tensors", root=str(path), test_fraction=0.2, **change))
        assert sample_ids(other.test) == test, change
        assert torch.equal(other.test.x, base.test.x) and torch.equal(other.test.y, base.test.y)
    moved = build_split(data_cfg(name="tensors", root=str(path), test_fraction=0.2, split_seed=7))
    assert sample_ids(moved.val) != sample_ids(base.val)  # split_seed does re-draw val, from what is left
    bigger = build_split(data_cfg(name="tensors", root=str(path), test_fraction=0.3))
    assert test < sample_ids(bigger.test)  # a larger test split holds the smaller one
    assert base.fingerprint != build_split(data_cfg(name="tensors", root=str(path))).fingerprint


def test_in_memory_sets_are_standardised_with_the_training_statistics_only():
    split = build_split(data_cfg(test_fraction=0.2))
    train_idx, _, test_idx = split_indices(1797, data_cfg(test_fraction=0.2))
    from trainrun.data.datasets import _digits_arrays

    images, _ = _digits_arrays()
    raw = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    mean, std = raw[train_idx].mean(), raw[train_idx].std()
    assert split.preprocess == {"scale": 1 / 16, "resize": None, "mean": float(mean), "std": float(std)}
    assert torch.equal(split.test.x, (raw[test_idx] - mean) / std)
    assert abs(float(split.train.x.mean())) < 1e-5 and abs(float(split.test.x.mean())) > 1e-3
    assert split.class_names == [str(k) for k in range(10)] and "/ 359 test" in split.description


def test_imagefolder_test_folder_and_cifar10_test_set_are_the_test_split(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            folder = tmp_path / "img" / part / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    folder = build_split(data_cfg(name="imagefolder", root=str(tmp_path / "img"), image_size=8, val_fraction=0.25))
    assert (len(folder.train), len(folder.val), len(folder.test)) == (9, 3, 6)  # val carved from train/
    assert folder.class_names == ["cat", "dog"] and folder.test.base.root.endswith("test")
    assert folder.preprocess == {"image_size": 8, "short_side": 9, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225]}
    with pytest.raises(DataError, match="has a test/ folder"):
        build_split(data_cfg(name="imagefolder", root=str(tmp_path / "img"), test_fraction=0.2))

    class FakeCIFAR10:  # torchvision checks the real archive's MD5s: no stand-in file passes for it
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

        def __init__(self, root, train, download):
            self.n = 50 if train else 20
            self.targets = [i % 10 for i in range(self.n)]
            self.train = train

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.fromarray(np.full((32, 32, 3), i, dtype=np.uint8)), self.targets[i]

    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    cifar = build_split(data_cfg(name="cifar10", val_fraction=0.2))
    assert cifar.test.base.train is False and cifar.val.base.train is True and cifar.train.base.train is True
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (40, 10, 20)
    assert not set(cifar.train.indices) & set(cifar.val.indices)
    assert cifar.class_names[0] == "airplane" and len(cifar.class_names) == 10


def user_data(names=("ant", "bee", "cow")):
    """A user factory (data._target_=test_test_split.user_data) with train/val/test and class names."""
    x, y = torch.randn(30, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    parts = {"train": (x[:18], y[:18]), "val": (x[18:24], y[18:24]), "test": (x[24:], y[24:])}
    return {**parts, "class_names": list(names)} if names is not None else parts


def test_user_data_gives_its_test_split_and_class_names_and_bad_names_are_one_line():
    from trainrun.data.user import build_user_split

    split = build_user_split(data_cfg(_target_="test_test_split.user_data"), classifies=True)
    assert len(split.test) == 6 and split.class_names == ["ant", "bee", "cow"] and split.preprocess == {}
    plain = build_user_split(data_cfg(_target_="test_test_split.user_data", names=None), classifies=True)
    assert plain.class_names is None and len(plain.test) == 6
    with pytest.raises(DataError, match=r"2 class_names for labels up to 2; give one name per class index"):
        build_user_split(data_cfg(_target_="test_test_split.user_data", names=["ant", "bee"]), classifies=True)


def test_test_fraction_where_the_data_brings_its_own_test_split_is_refused_before_compute():
    from trainrun.config import validate

    for overrides, needle in ((["data=cifar10", "data.test_fraction=0.1"], "has its own test split"),
                              (["data.test_fraction=0.8"], "no training samples are left"),
                              (["data.test_fraction=1.5"], "must be in [0, 1)")):
        with pytest.raises(ConfigError, match=r"data\.test_fraction=") as e:
            validate(compose(overrides))
        assert needle in str(e.value) and "\n" not in str(e.value)


# --- nothing in training touches the test split -------------------------------------------------------------------

def _train(tmp_path: Path, name: str, data_file: Path) -> Path:
    from trainrun.runner import run

    cfg = compose([*FAST, "model=mlp", "data=tensors", f"data.root={data_file}", "data.test_fraction=0.25",
                   "data.batch_size=32", "trainer.max_steps=24", "trainer.eval_every=6", "trainer.ckpt_every=6",
                   "trainer.device=cpu", "regularization.ema_decay=0.9"])
    run_dir = tmp_path / name
    run_dir.mkdir()
    run(cfg, run_dir)
    return run_dir


def test_poisoned_test_samples_change_nothing_that_training_or_selection_produces(tmp_path):
    clean = numbered_tensors(tmp_path / "clean.pt")
    data = torch.load(clean)
    _, _, test_idx = split_indices(400, data_cfg(test_fraction=0.25))
    data["y"][test_idx] = (data["y"][test_idx] + 1) % 4  # wrong labels and noise images, only in the test split
    data["x"][test_idx, :, 1:] = 100 * torch.randn(len(test_idx), 1, 7, 8)
    torch.save(data, tmp_path / "poisoned.pt")
    a, b = _train(tmp_path, "a", clean), _train(tmp_path, "b", tmp_path / "poisoned.pt")
    kept = [c.name for c in checkpoint.list_checkpoints(a)]
    assert kept and kept == [c.name for c in checkpoint.list_checkpoints(b)]
    for name in kept:  # the same weights, optimizer state, RNG: byte for byte
        assert sha_of(a, int(name[5:])) == sha_of(b, int(name[5:]))
    assert (a / "checkpoints/best").read_text() == (b / "checkpoints/best").read_text()
    evals = [[r for r in read_jsonl(d / "metrics.jsonl") if "val/acc" in r] for d in (a, b)]
    assert evals[0] and [{k: v for k, v in r.items() if k.startswith("val")} for r in evals[0]] == \
        [{k: v for k, v in r.items() if k.startswith("val")} for r in evals[1]]
    metas = [checkpoint.read_meta(d / "checkpoints" / (d / "checkpoints/best").read_text().strip()) for d in (a, b)]
    assert metas[0]["data"]["fingerprint"] != metas[1]["data"]["fingerprint"]  # the data did differ: in test only

    from trainrun.runner import run

    results = []
    for d in (a, b):  # mode=test does read the test split: the poisoned one scores far worse
        cfg = compose([*FAST, "mode=test", f"resume={d}", "trainer.device=cpu"])
        (d / "t").mkdir()
        results.append(run(cfg, d / "t"))
    assert results[0]["test/acc"] > 0.8 and results[1]["test/acc"] < 0.3
    record = json.loads((a / "test.json").read_text())
    assert record["selected_by"] == "best" and record["weights"] == "ema" and "test_raw/acc" in record["metrics"]


def test_mode_test_without_a_test_split_names_where_one_comes_from(tmp_path):
    from trainrun.runner import run

    cfg = compose([*FAST, "model=mlp", "trainer.max_steps=2", "trainer.device=cpu", "data.limit_train=128"])
    (tmp_path / "r").mkdir()
    run(cfg, tmp_path / "r")
    with pytest.raises(DataError, match=r"mode=test: data=digits has no test split: .*data\.test_fraction=0") as e:
        run(compose([*FAST, "mode=test", f"resume={tmp_path / 'r'}"]), tmp_path / "t")
    assert "\n" not in str(e.value)


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_mode_test_evaluates_the_best_checkpoint_and_records_it_with_the_checkpoint(tmp_path):
    common = ["model=mlp", "data.test_fraction=0.2", *FAST]
    run_cli(tmp_path, "run_name=r", "trainer.max_steps=30", "trainer.eval_every=10", "trainer.ckpt_every=10",
            "checkpoint.monitor=val/loss", "checkpoint.monitor_mode=min", "optimizer.lr=0.05", *common)
    ckpts = tmp_path / "runs/r/checkpoints"
    best = ckpts / (ckpts / "best").read_text().strip()
    before = {f: (best / f).read_bytes() for f in ("state.pt", "meta.json", "state.pt.sha256")}
    p = run_cli(tmp_path, "mode=test", "resume=runs/r", *common)
    record = json.loads((tmp_path / "runs/r/test.json").read_text())
    assert record == json.loads((best / "test.json").read_text())
    assert Path(record["checkpoint"]).name == best.name and record["selected_by"] == "best"
    assert record["sha256"] == sha_of(tmp_path / "runs/r", record["step"]) and record["test_samples"] == 359
    assert record["data_fingerprint"] == record["trained_data_fingerprint"]
    assert f"{record['metrics']['test/acc']:.4f}" in p.stdout and "classes: 0, 1, 2" in p.stdout
    assert {f: (best / f).read_bytes() for f in before} == before  # its identity is untouched
    checkpoint.load(best)  # and it still loads, verified
    named = run_cli(tmp_path, "mode=test", f"resume=runs/r/checkpoints/{best.name}", *common)
    assert json.loads((tmp_path / "runs/r/test.json").read_text())["selected_by"] == "named"
    assert f"{record['metrics']['test/acc']:.4f}" in named.stdout  # the same checkpoint: the same result


def test_sweep_summary_reports_the_test_metric_of_the_job_validation_selects(tmp_path):
    common = ["model=mlp", "trainer.max_steps=8", "trainer.eval_every=4", "logger.progress=off",
              "data.test_fraction=0.2", "logger.plots=false"]
    run_cli(tmp_path, "-m", *common, "optimizer.lr=0.03,0.0003", "sweep_name=s")
    d = tmp_path / "multirun/s"
    jobs = sorted(p.name for p in d.iterdir() if (p / "result.json").is_file())
    for job in jobs:
        run_cli(tmp_path, "mode=test", f"resume='{d / job}'", "logger.progress=off")  # quoted: the name holds = and ,
    s = json.loads((d / "summary.json").read_text())  # rewritten by each mode=test
    by_job = {j["job"]: j for j in s["jobs"]}
    chosen = max(jobs, key=lambda job: by_job[job]["best"])
    assert s["selected"]["job"] == chosen
    assert s["selected"]["test/acc"] == json.loads((d / chosen / "test.json").read_text())["metrics"]["test/acc"]
    assert all(by_job[job]["test"]["value"] is not None for job in jobs)
    assert "test/acc" in (d / "summary.csv").read_text().splitlines()[0]


def test_selection_uses_the_validation_metric_never_the_test_metric(tmp_path):
    from trainrun.sweep import summarize, write_result

    for name, best, test in (("lr=0.1", 0.90, 0.99), ("lr=0.01", 0.95, 0.80)):
        (tmp_path / name).mkdir()
        write_result(tmp_path / name, status="completed", overrides=[name], metrics={"val/acc": best}, best=best)
        (tmp_path / name / "test.json").write_text(json.dumps({"metrics": {"test/acc": test}, "selected_by": "best"}))
    s = summarize(tmp_path, "val/acc", "max")
    assert s["selected"]["job"] == "lr=0.01" and s["selected"]["test/acc"] == 0.80
    assert summarize(tmp_path, "val/acc", "min")["selected"]["job"] == "lr=0.1"
