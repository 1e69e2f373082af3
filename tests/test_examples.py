"""The example projects under examples/ (faces, regression): their own pieces, their configs, and trainrun
driving them through the CLI exactly as a user would (`trainrun --config-dir examples/NAME/configs +recipe=...`).

The examples are not pip-installed here: the subprocesses find them on PYTHONPATH, as an editable install would.
"""
import importlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli, sha_of

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FACES = EXAMPLES / "faces"
REGRESSION = EXAMPLES / "regression"
CLI_OUTPUT = ["logger.plots=false", "logger.progress=lines"]


@pytest.fixture
def faces(monkeypatch):
    monkeypatch.syspath_prepend(str(FACES))
    return {name: importlib.import_module(f"faces_example.{name}") for name in ("data", "model", "callbacks")}


@pytest.fixture
def regression(monkeypatch):
    monkeypatch.syspath_prepend(str(REGRESSION))
    return {name: importlib.import_module(f"regression_example.{name}") for name in ("data", "model")}


# ---------------------------------------------------------------- faces: the dataset


def test_faces_split_is_per_class_disjoint_and_fixed_by_split_seed(faces):
    splits = faces["data"].lfw_splits(val_fraction=0.25, split_seed=0)
    train, val = splits["train"], splits["val"]
    assert set(splits) == {"train", "val"}
    assert (len(train), len(val)) == (150, 50)
    assert train.labels.bincount().tolist() == [75, 75] and val.labels.bincount().tolist() == [25, 25]
    train_index, val_index = set(train.indices.tolist()), set(val.indices.tolist())
    assert not train_index & val_index and train_index | val_index == set(range(200))
    again = faces["data"].lfw_splits(val_fraction=0.25, split_seed=0)["val"]
    other = faces["data"].lfw_splits(val_fraction=0.25, split_seed=1)["val"]
    assert torch.equal(again.indices, val.indices) and torch.equal(again.images, val.images)
    assert not torch.equal(other.indices, val.indices)


def test_faces_are_standardised_with_the_training_statistics(faces):
    splits = faces["data"].lfw_splits(flip=False)
    train, val = splits["train"], splits["val"]
    assert abs(float(train.images.mean())) < 1e-5 and abs(float(train.images.std()) - 1) < 1e-5
    assert (val.mean, val.std) == (train.mean, train.std)
    raw, _ = faces["data"].load_lfw_subset()
    assert torch.allclose(val.images, (raw[val.indices] - train.mean) / train.std)


def test_faces_samples_are_image_label_pairs(faces):
    for dataset in faces["data"].lfw_splits().values():
        x, y = dataset[0]
        assert x.shape == (1, 25, 25) and x.dtype == torch.float32
        assert isinstance(y, int) and y in (0, 1)


def test_faces_train_flip_draws_from_the_global_rng_and_val_never_flips(faces):
    splits = faces["data"].lfw_splits()
    train, val = splits["train"], splits["val"]
    image = train.images[3]
    seen = []
    for seed in range(16):
        torch.manual_seed(seed)
        x, _ = train[3]
        torch.manual_seed(seed)
        assert torch.equal(x, train[3][0])  # the same global RNG state: the same flip
        assert torch.equal(x, image) or torch.equal(x, image.flip(-1))
        seen.append(torch.equal(x, image))
    assert any(seen) and not all(seen)  # seeds 0-15 give both outcomes
    state = torch.get_rng_state()
    assert torch.equal(val[3][0], val.images[3])
    assert torch.equal(torch.get_rng_state(), state)  # validation draws nothing


def test_faces_bad_val_fraction_is_refused(faces):
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        faces["data"].lfw_splits(val_fraction=1.5)
    with pytest.raises(ValueError, match="class"):
        faces["data"].lfw_splits(val_fraction=0.001)


# ---------------------------------------------------------------- faces: the model and the callback


def test_facenet_returns_num_outputs_logits_per_image(faces):
    x = torch.randn(4, 1, 25, 25)
    assert faces["model"].FaceNet((1, 25, 25), 1, width=16)(x).shape == (4, 1)
    assert faces["model"].FaceNet((1, 25, 25), 3, width=8)(x).shape == (4, 3)
    with pytest.raises(ValueError, match="channels, height, width"):
        faces["model"].FaceNet((625,), 1)


class _Run:
    def __init__(self, directory: Path):
        self.dir = directory


def _feed(tally, steps, run=None):
    """Steps with a made-up loss, and an evaluation every third step."""
    for step in steps:
        tally.on_step_end(run, step, {"train/loss": 1.0 / step + 0.1 * math.sin(step), "lr": 0.001})
        if step % 3 == 0:
            tally.on_eval_end(run, step, {"val/loss": 1.0 / step, "val/acc": 0.5 + 0.4 * math.sin(step)})


def test_training_tally_resumed_from_its_checkpointed_state_equals_an_uninterrupted_one(faces, tmp_path):
    tally_class = faces["callbacks"].TrainingTally
    whole = tally_class()
    _feed(whole, range(1, 11))
    first = tally_class()
    _feed(first, range(1, 6))
    torch.save({"callbacks": {"tally": first.state_dict()}}, tmp_path / "state.pt")
    second = tally_class()
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["callbacks"]["tally"])
    _feed(second, range(6, 11))
    assert second.state_dict() == whole.state_dict()
    assert whole.steps == 10 and whole.evaluations == 3
    assert whole.best == max(0.5 + 0.4 * math.sin(s) for s in (3, 6, 9)) and whole.best_step == 9
    whole.on_fit_end(_Run(tmp_path), {})
    assert json.loads((tmp_path / "training_tally.json").read_text()) == whole.state_dict()


def test_training_tally_refuses_the_state_of_another_monitor(faces):
    state = faces["callbacks"].TrainingTally(monitor="val/loss", mode="min").state_dict()
    with pytest.raises(ValueError, match="val/loss"):
        faces["callbacks"].TrainingTally().load_state_dict(state)


# ---------------------------------------------------------------- regression: the dataset and the model


def test_diabetes_split_sizes_standardisation_and_determinism(regression):
    splits = regression["data"].diabetes_splits(val_fraction=0.2, split_seed=0)
    train_x, train_y = splits["train"].tensors
    val_x, val_y = splits["val"].tensors
    assert (len(train_y), len(val_y)) == (354, 88)
    assert train_x.shape == (354, 10) and train_y.shape == (354, 1) and val_y.dtype == torch.float32
    assert train_x.mean(0).abs().max() < 1e-5 and (train_x.std(0) - 1).abs().max() < 1e-5
    assert abs(float(train_y.mean())) < 1e-5 and abs(float(train_y.std()) - 1) < 1e-5
    x, y = splits["train"][0]
    assert x.shape == (10,) and y.shape == (1,)
    again = regression["data"].diabetes_splits(val_fraction=0.2, split_seed=0)["val"].tensors
    other = regression["data"].diabetes_splits(val_fraction=0.2, split_seed=1)["val"].tensors
    assert torch.equal(again[0], val_x) and torch.equal(again[1], val_y)
    assert not torch.equal(other[1], val_y)
    train_index, val_index = regression["data"].random_split(442, 0.2, 0)
    assert not set(train_index.tolist()) & set(val_index.tolist()) and len(train_index) + len(val_index) == 442


def test_diabetes_mlp_output_matches_the_target_shape(regression):
    x = torch.randn(5, 10)
    assert regression["model"].DiabetesMLP((10,), 1, hidden_units=32, hidden_layers=1)(x).shape == (5, 1)
    linear = regression["model"].DiabetesMLP((10,), 2, hidden_layers=0)
    assert linear(x).shape == (5, 2) and sum(p.numel() for p in linear.parameters()) == 22


# ---------------------------------------------------------------- configs: each YAML names code that takes its keys


def _compose(config_dir: Path, overrides):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="t"):
        return compose("config", overrides=[f"hydra.searchpath=[file://{config_dir}]", *overrides])


@pytest.mark.parametrize("example, recipe, model, data, task, monitor", [
    (FACES, "faces", "faces_example.model.FaceNet", "faces_example.data.lfw_splits", "binary", "val/acc"),
    (REGRESSION, "diabetes", "regression_example.model.DiabetesMLP", "regression_example.data.diabetes_splits",
     "regression", "val/r2"),
])
def test_recipe_composes_the_examples_options(example, recipe, model, data, task, monitor):
    cfg = _compose(example / "configs", [f"+recipe={recipe}"])
    assert (cfg.model._target_, cfg.data._target_, cfg.task.name) == (model, data, task)
    assert (cfg.checkpoint.monitor, cfg.checkpoint.monitor_mode) == (monitor, "max")
    assert cfg.data.batch_size == 32
    if example is FACES:
        assert cfg.callbacks.tally._target_ == "faces_example.callbacks.TrainingTally"
    header = (example / "configs" / "recipe" / f"{recipe}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and header[1].startswith("# ")


@pytest.mark.parametrize("example, recipe, offered, sizes, output", [
    (FACES, "faces", {"input_shape": (1, 25, 25), "num_classes": 2, "num_outputs": 1}, (150, 50), (1,)),
    (REGRESSION, "diabetes", {"input_shape": (10,), "num_outputs": 1}, (354, 88), (1,)),
])
def test_composed_options_build_through_trainrun_usercode(faces, regression, example, recipe, offered, sizes, output):
    """The composed model/data nodes go through trainrun's own factory call (usercode.call_factory: the node's own
    keys, trainrun's keys only where the signature names them, the offered values) and dataset check."""
    from trainrun.config import DataConfig, ModelConfig
    from trainrun.usercode import as_datasets, call_factory

    cfg = _compose(example / "configs", [f"+recipe={recipe}"])
    datasets = as_datasets(call_factory(cfg.data, "data", DataConfig.__dataclass_fields__, {}),
                           target=cfg.data._target_)
    assert (len(datasets["train"]), len(datasets["val"])) == sizes
    model = call_factory(cfg.model, "model", ModelConfig.__dataclass_fields__, offered)
    batch = torch.stack([datasets["val"][i][0] for i in range(3)])
    assert model(batch).shape == (3, *output)


# ---------------------------------------------------------------- the CLI, as a user runs it


@pytest.fixture
def trainrun_cli(monkeypatch, tmp_path):
    """`python -m trainrun --config-dir EXAMPLE/configs ARGS` in tmp_path with the examples on PYTHONPATH (both:
    every example command of the file has the same environment, so all but the first are forked from one
    pre-imported Python, see conftest.trainrun_process)."""
    def run(example: Path, *args: str, check: bool = True):
        assert example in (FACES, REGRESSION)
        paths = [str(FACES), str(REGRESSION), *filter(None, [os.environ.get("PYTHONPATH")])]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
        return run_cli(tmp_path, "--config-dir", str(example / "configs"), *args, *CLI_OUTPUT,
                       f"output_root={tmp_path / 'runs'}", check=check)
    run.runs = tmp_path / "runs"
    return run


def _stop_resume_and_straight(trainrun_cli, example, common, stop_at, total):
    """An uninterrupted run, and one stopped at `stop_at` then resumed; returns their run directories."""
    trainrun_cli(example, *common, "run_name=straight")
    stopped = trainrun_cli(example, *common, "run_name=split", f"trainer.stop_at_step={stop_at}")
    assert f"stopped at step {stop_at}" in stopped.stdout
    split = trainrun_cli.runs / "split"
    resumed = trainrun_cli(example, *common, f"resume={split}")
    assert "resumed from" in resumed.stdout and f"at step {stop_at}" in resumed.stdout
    straight = trainrun_cli.runs / "straight"
    assert sha_of(straight, total) == sha_of(split, total)
    return straight, split


def _final_checkpoint(run_dir: Path, step: int):
    """(the model's weights, meta.json) of checkpoint `step`."""
    directory = run_dir / "checkpoints" / f"step_{step:09d}"
    weights = torch.load(directory / "state.pt", weights_only=True)["model"]
    return weights, json.loads((directory / "meta.json").read_text())


def test_faces_stopped_and_resumed_run_equals_the_uninterrupted_one(trainrun_cli):
    common = ["+recipe=faces", "trainer.max_steps=12", "trainer.eval_every=4", "trainer.ckpt_every=4"]
    straight, split = _stop_resume_and_straight(trainrun_cli, FACES, common, stop_at=7, total=12)
    tally = json.loads((straight / "training_tally.json").read_text())
    assert json.loads((split / "training_tally.json").read_text()) == tally
    accuracies = [row["val/acc"] for row in read_jsonl(straight / "metrics.jsonl") if "val/acc" in row]
    assert len(accuracies) == 3 and tally["steps"] == 12 and tally["evaluations"] == 3
    assert tally["best"] == max(accuracies) and tally["loss_sum"] > 0
    # the user's code, not a built-in: FaceNet's layers, and LFW's 150 training images (at most 5 batches an epoch)
    weights, meta = _final_checkpoint(straight, 12)
    assert weights["features.0.0.weight"].shape == (16, 1, 3, 3) and weights["head.weight"].shape == (1, 64)
    assert meta["epoch"] >= 2


def test_regression_stopped_and_resumed_run_equals_the_uninterrupted_one(trainrun_cli):
    common = ["+recipe=diabetes", "trainer.max_steps=16", "trainer.eval_every=8", "trainer.ckpt_every=8"]
    straight, _ = _stop_resume_and_straight(trainrun_cli, REGRESSION, common, stop_at=13, total=16)
    # the user's code, not a built-in: DiabetesMLP's layers, and 354 training patients (11 or 12 batches an epoch)
    weights, meta = _final_checkpoint(straight, 16)
    assert weights["net.1.weight"].shape == (32, 10) and weights["net.3.weight"].shape == (1, 32)
    assert meta["epoch"] == 1
    evaluations = [row for row in read_jsonl(straight / "metrics.jsonl") if "val/r2" in row]
    assert [row["step"] for row in evaluations] == [8, 16]
    assert {"val/loss", "val/mae"} <= set(evaluations[-1])
    assert evaluations[-1]["val/r2"] > 0  # better than predicting the training mean, after 16 steps


def test_a_bad_value_for_the_users_model_fails_in_one_line_before_training(trainrun_cli):
    p = trainrun_cli(FACES, "+recipe=faces", "model.width=0", "run_name=bad", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error:") and "width=0" in lines[0]
    assert "FaceNet" in lines[0] or "faces_example" in lines[0]
    assert not list((trainrun_cli.runs / "bad").glob("checkpoints/*"))
