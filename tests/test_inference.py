"""trainrun.load (trainrun/inference.py) and mode=predict, on one short digits run shared with tests/test_export.py."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import trainrun
from conftest import FAST, read_jsonl
from trainrun import checkpoint
from trainrun.errors import CheckpointError, ConfigError

_RUNS = {}  # name -> run directory: each training run once per session, whichever test file asks first


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="inference"):
        return hydra_compose("config", overrides=list(overrides))


def trained(tmp_path_factory, name: str, overrides) -> Path:
    """A real, checkpointed training run (in-process), made once per session."""
    if name not in _RUNS:
        from trainrun.runner import run

        run_dir = tmp_path_factory.mktemp("runs") / name
        run_dir.mkdir()
        run(compose([*FAST, "trainer.device=cpu", *overrides]), run_dir)
        _RUNS[name] = run_dir
    return _RUNS[name]


DIGITS_CNN = ["model=cnn", "data.test_fraction=0.2", "regularization.ema_decay=0.9", "trainer.max_steps=20",
              "trainer.eval_every=10", "trainer.ckpt_every=10", "optimizer.lr=0.003"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A small CNN on digits with EMA and a test split: 20 steps, checkpoints at 10 and 20."""
    return trained(tmp_path_factory, "digits_cnn", DIGITS_CNN)


def mode(name: str, run_dir: Path, out: Path, *overrides):
    from trainrun.runner import run

    out.mkdir(parents=True, exist_ok=True)
    return run(compose([*FAST, f"mode={name}", f"resume={run_dir}", *overrides]), out)


def raw_digits(split: str, stored_data: dict):
    """The raw digits images (values 0..16, never standardised) of one split of the run's data, and their labels."""
    from trainrun.data.datasets import _digits_arrays, split_indices

    images, target = _digits_arrays()
    parts = dict(zip(("train", "val", "test"), split_indices(len(target), OmegaConf.create(stored_data))))
    idx = parts[split]
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1)[idx], torch.tensor(target)[idx]


def _resave(src: Path, dst_run: Path, edit) -> Path:
    """A checkpoint written by trainrun.checkpoint.save (valid SHA256s) whose meta.json `edit` changed."""
    state, meta = checkpoint.load(src)
    edit(meta)
    dst_run.mkdir(parents=True)
    path, _ = checkpoint.save(dst_run, meta["step"], state, meta, keep_last=1, metric=None, mode="max", keep_best=False)
    return path


# --- load() --------------------------------------------------------------------------------------------------------

def test_load_predicts_raw_inputs_as_the_runs_own_evaluation_did(digits_run):
    loaded = trainrun.load(digits_run)
    meta = loaded.meta
    assert loaded.checkpoint == checkpoint.list_checkpoints(digits_run)[-1] and meta["step"] == 20
    assert loaded.weights == "ema" and not loaded.model.training
    assert loaded.class_names == [str(k) for k in range(10)]
    x, y = raw_digits("val", meta["config"]["resolved"]["data"])
    assert float(x.max()) == 16.0  # really raw: preprocess has to scale and standardise them
    for weights, metric in (("auto", "val/acc"), ("model", "val_raw/acc")):
        labels, probs = trainrun.load(digits_run, weights=weights).predict(x)
        correct = int((labels == y).sum())
        assert correct == round(meta["metrics"][metric] * len(y)), (weights, correct, meta["metrics"])
        assert probs.shape == (len(y), 10) and torch.allclose(probs.sum(1), torch.ones(len(y)), atol=1e-5)
    assert 0.5 < meta["metrics"]["val/acc"] < 1.0  # learnt something, and EMA and raw weights differ:
    assert meta["metrics"]["val/acc"] != meta["metrics"]["val_raw/acc"]


def test_load_holds_the_ema_weights_when_the_checkpoint_has_them_and_the_raw_ones_on_request(digits_run):
    state, _ = checkpoint.load(checkpoint.list_checkpoints(digits_run)[-1])
    picked = {"auto": state["ema"]["module"], "ema": state["ema"]["module"], "model": state["model"]}
    assert not all(torch.equal(state["ema"]["module"][k], state["model"][k]) for k in state["model"])
    for weights, expected in picked.items():
        got = trainrun.load(digits_run, weights=weights).model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), weights
    with pytest.raises(ConfigError, match=r"weights='best'.*auto, model, ema"):
        trainrun.load(digits_run, weights="best")


def test_load_of_a_checkpoint_dir_or_pointer_and_of_an_older_checkpoint(digits_run):
    first = checkpoint.list_checkpoints(digits_run)[0]
    assert trainrun.load(first).meta["step"] == 10
    best = checkpoint.read_pointer(digits_run, "best")
    assert trainrun.load(digits_run / "checkpoints" / "best").checkpoint == best


def test_a_tampered_checkpoint_is_refused_in_one_line(digits_run, tmp_path):
    src = checkpoint.list_checkpoints(digits_run)[-1]
    bad = tmp_path / "run" / "checkpoints" / src.name
    shutil.copytree(src, bad)
    data = bytearray((bad / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"failed its SHA256 check: state\.pt") as e:
        trainrun.load(bad)
    assert "\n" not in str(e.value)


def test_a_user_model_target_in_the_stored_config_is_not_imported_without_trust_code(digits_run, tmp_path):
    def name_user_model(meta):
        meta["config"]["resolved"]["model"] = {"_target_": "never_imported_pkg.build_net", "width": 3}
    forged = _resave(checkpoint.list_checkpoints(digits_run)[-1], tmp_path / "forged", name_user_model)
    with pytest.raises(ConfigError, match=r"model\._target_=never_imported_pkg\.build_net.*trust_code=True") as e:
        trainrun.load(forged)
    assert "\n" not in str(e.value) and "never_imported_pkg" not in sys.modules
    with pytest.raises(ConfigError, match="never_imported_pkg"):  # trusted: imported, and it does not exist
        trainrun.load(forged, trust_code=True)


def test_a_checkpoint_from_before_io_names_why_in_one_line(digits_run, tmp_path):
    old = _resave(checkpoint.list_checkpoints(digits_run)[-1], tmp_path / "old", lambda meta: meta.pop("io"))
    with pytest.raises(CheckpointError, match=r"predates trainrun\.load.*mode=predict") as e:
        trainrun.load(old)
    assert "\n" not in str(e.value)


def test_import_trainrun_stays_cheap_and_load_is_there():
    import subprocess

    code = "import sys, trainrun; assert 'torch' not in sys.modules, 'torch imported'; assert callable(trainrun.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- mode=predict --------------------------------------------------------------------------------------------------

def test_predict_writes_one_row_per_test_sample_with_label_class_and_probabilities(digits_run, tmp_path):
    result = mode("predict", digits_run, tmp_path / "p", f"predict.output={tmp_path / 'pred.csv'}")
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    loaded = trainrun.load(digits_run)
    x, y = raw_digits("test", loaded.meta["config"]["resolved"]["data"])
    assert result["rows"] == len(rows) == len(y) == 359
    assert list(rows[0]) == ["index", "target", "label", "class_name", *[f"prob_{k}" for k in range(10)]]
    labels, probs = loaded.predict(x)
    assert [int(r["index"]) for r in rows] == list(range(len(y)))
    assert [int(r["target"]) for r in rows] == y.tolist()
    assert [int(r["label"]) for r in rows] == labels.tolist() == [int(r["class_name"]) for r in rows]
    got = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])
    assert torch.allclose(got, probs, atol=1e-6)


def test_predict_jsonl_of_the_train_split_and_a_bad_suffix(digits_run, tmp_path):
    out = tmp_path / "train.jsonl"
    mode("predict", digits_run, tmp_path / "p", "predict.split=train", f"predict.output={out}")
    rows = read_jsonl(out)
    assert len(rows) == 1079 and set(rows[0]) >= {"index", "target", "label", "class_name", "prob_9"}
    with pytest.raises(ConfigError, match=r"predict\.output=.*out\.txt.*\.csv or \.jsonl"):
        mode("predict", digits_run, tmp_path / "q", f"predict.output={tmp_path / 'out.txt'}")
    assert json.loads(out.read_text().splitlines()[0])["index"] == 0


def test_preprocess_of_image_files_is_the_validation_transform(tmp_path):
    import numpy as np
    from PIL import Image

    from trainrun.data.datasets import _image_transform
    from trainrun.inference import Preprocess

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(((20, 30), (17, 12))):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(files[-1])
    pre = Preprocess({"image_size": 8, "short_side": 9, "mean": mean, "std": std}, (3, 8, 8))
    expected = torch.stack([_image_transform(8, False, mean, std, False)(Image.open(f).convert("RGB"),
                                                                        torch.Generator()) for f in files])
    assert torch.equal(pre(files), expected) and pre(str(files[0])).shape == (1, 3, 8, 8)
    from trainrun.data.transforms import image_eval_transform

    bicubic = Preprocess({"image_size": 8, "short_side": 9, "mean": mean, "std": std, "interpolation": "bicubic"},
                         (3, 8, 8))
    plain = image_eval_transform(8, 9, mean, std, "bicubic")  # what a data.interpolation=bicubic run evaluated on
    expected = torch.stack([plain(Image.open(f).convert("RGB"), torch.Generator()) for f in files])
    assert torch.equal(bicubic(files), expected) and not torch.equal(bicubic(files), pre(files))
    with pytest.raises(ConfigError, match=r"input of shape \(1, 1, 4, 4\).*\[N, 1, 8, 8\]"):
        Preprocess({"scale": 1.0, "resize": None, "mean": 0.0, "std": 1.0}, (1, 8, 8))(torch.zeros(1, 4, 4))


def test_a_regression_run_of_user_code_predicts_outputs_and_loads_only_when_trusted(tmp_path_factory, tmp_path):
    from userpkg.data import diabetes

    run_dir = trained(tmp_path_factory, "diabetes", ["task=regression", "data._target_=userpkg.data.diabetes",
                                                     "model._target_=userpkg.nets.regressor", "optimizer=sgd",
                                                     "optimizer.lr=0.05", "trainer.max_steps=10",
                                                     "trainer.eval_every=5", "checkpoint.monitor=val/r2"])
    out = tmp_path / "val.jsonl"
    mode("predict", run_dir, tmp_path / "p", "predict.split=val", f"predict.output={out}",
         "data._target_=userpkg.data.diabetes", "model._target_=userpkg.nets.regressor")
    rows = read_jsonl(out)
    x, y = diabetes()["val"]
    assert len(rows) == len(y) == 88 and set(rows[0]) == {"index", "target", "output_0"}
    assert [r["target"] for r in rows] == pytest.approx(y.tolist())
    with pytest.raises(ConfigError, match=r"model\._target_=userpkg\.nets\.regressor.*trust_code=True"):
        trainrun.load(run_dir)
    loaded = trainrun.load(run_dir, trust_code=True)
    assert loaded.task == "regression" and loaded.class_names is None
    assert loaded.outputs(x).tolist() == pytest.approx([r["output_0"] for r in rows], abs=1e-6)
    with pytest.raises(ConfigError, match=r"task=regression has no labels or probabilities; use \.outputs"):
        loaded.predict(x)


def test_single_channel_images_may_come_without_their_channel_axis():
    import numpy as np

    from trainrun.inference import Preprocess

    prep = Preprocess({}, (1, 8, 8))
    assert tuple(prep(np.zeros((5, 8, 8))).shape) == (5, 1, 8, 8)  # load_digits().images
    assert tuple(prep(np.zeros((8, 8))).shape) == (1, 1, 8, 8)
    assert tuple(prep(np.zeros((5, 1, 8, 8))).shape) == (5, 1, 8, 8)
