"""Tasks: each loss and metric against a reference (torch / scikit-learn), sums that add up over batches (so ranks
reduce exactly), and each task trained through the CLI on real data."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import trainrun_process, read_jsonl, structured
from trainrun.config import TaskConfig
from trainrun.errors import ConfigError, DataError
from trainrun.tasks.classification import Classification
from trainrun.tasks.regression import Regression
from trainrun.tasks.sigmoid import Binary, Multilabel

TESTS = Path(__file__).resolve().parent


def task_cfg(**values):
    return structured(TaskConfig, **values)


def metrics_in_halves(task, output, target):
    """eval metrics from the sums of two halves added together (as batches and ranks add them)."""
    half = len(target) // 2
    a, b = task.eval_sums(output[:half], target[:half]), task.eval_sums(output[half:], target[half:])
    return task.eval_metrics({k: a[k] + b[k] for k in a}, len(target))


def test_classification_matches_cross_entropy_and_argmax():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    task = Classification(task_cfg(), nn.CrossEntropyLoss(), (4,))
    got = metrics_in_halves(task, out, y)
    assert got["val/loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert got["val/acc"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert task.initial_loss() == pytest.approx(math.log(4))


def test_binary_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    g = torch.Generator().manual_seed(1)
    out, y = torch.randn(61, 1, generator=g), torch.randint(0, 2, (61,), generator=g)
    task = Binary(task_cfg(name="binary", threshold=0.6), nn.BCEWithLogitsLoss(), (1,))
    got = metrics_in_halves(task, out, y)
    pred = (torch.sigmoid(out.flatten()) > 0.6).long()
    assert got["val/acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["val/precision"] == pytest.approx(precision_score(y, pred))
    assert got["val/recall"] == pytest.approx(recall_score(y, pred))
    assert got["val/f1"] == pytest.approx(f1_score(y, pred))
    assert got["val/loss"] == pytest.approx(F.binary_cross_entropy_with_logits(out.flatten(), y.float()).item(),
                                            rel=1e-6)


def test_binary_pos_weight_weighs_the_positive_term():
    out, y = torch.tensor([[0.3], [-1.2]]), torch.tensor([1, 0])
    weighted = Binary(task_cfg(name="binary"), nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0])), (1,))
    by_hand = -(3.0 * F.logsigmoid(torch.tensor(0.3)) + F.logsigmoid(torch.tensor(1.2))) / 2
    assert weighted.loss(out, y).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_multilabel_micro_f1_and_label_accuracy_match_scikit_learn():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(2)
    out, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40, 3), generator=g).float()
    task = Multilabel(task_cfg(name="multilabel"), nn.BCEWithLogitsLoss(), (3,))
    got = metrics_in_halves(task, out, y)
    pred = (out > 0).long()
    assert got["val/f1"] == pytest.approx(f1_score(y.long(), pred, average="micro"))
    assert got["val/acc"] == pytest.approx((pred == y.long()).float().mean().item())


@pytest.mark.parametrize("shape", [(), (3,), (2, 2)])
def test_regression_mae_rmse_r2_match_scikit_learn(shape):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    g = torch.Generator().manual_seed(3)
    y = torch.randn(30, *shape, generator=g) * 3 + 1
    out = y + 0.5 * torch.randn(30, *shape, generator=g)
    task = Regression(task_cfg(name="regression"), nn.MSELoss(), shape)
    got = metrics_in_halves(task, out, y)
    yt, yp = y.reshape(30, -1).double().numpy(), out.reshape(30, -1).double().numpy()
    assert got["val/mae"] == pytest.approx(mean_absolute_error(yt, yp), rel=1e-9)
    assert got["val/rmse"] == pytest.approx(math.sqrt(mean_squared_error(yt, yp)), rel=1e-9)
    assert got["val/r2"] == pytest.approx(r2_score(yt, yp), rel=1e-9)
    assert got["val/loss"] == pytest.approx(F.mse_loss(out, y).item(), rel=1e-5)


def test_output_shape_mismatch_is_one_line():
    task = Regression(task_cfg(name="regression"), nn.MSELoss(), (3,))
    with pytest.raises(ConfigError, match=r"model._target_=x: the model returns \(4,\) per sample, but "
                                          r"task=regression needs \[3\]"):
        task.check_output(torch.zeros(1, 4), "model._target_=x")
    Binary(task_cfg(name="binary"), nn.BCEWithLogitsLoss(), (1,)).check_output(torch.zeros(1), "m")  # [N] is fine


@pytest.mark.parametrize("task,y,words", [
    (Binary(task_cfg(name="binary"), nn.BCEWithLogitsLoss(), (1,)), torch.tensor([0, 2, 1]), "targets of 0 and 1"),
    (Regression(task_cfg(name="regression"), nn.MSELoss(), ()), torch.tensor([1, 2]), "real-valued (float)"),
    (Classification(task_cfg(), nn.CrossEntropyLoss(), (3,)), torch.tensor([0.5, 1.0]), "integer class index"),
    (Multilabel(task_cfg(name="multilabel"), nn.BCEWithLogitsLoss(), (2,)), torch.tensor([0.0, 1.0]), "multi-hot"),
])
def test_targets_that_do_not_fit_the_task_are_refused(task, y, words):
    with pytest.raises(DataError, match="task="):
        task.check_targets(y, "data train split")
    try:
        task.check_targets(y, "data train split")
    except DataError as e:
        assert words in str(e)


def test_class_index_techniques_are_refused_for_other_tasks():
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup
    from trainrun.config import validate

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["task=regression", "regularization.mixup_alpha=0.2",
                                           "checkpoint.monitor=val/r2"])
        with pytest.raises(ConfigError, match="regularization.mixup_alpha=0.2: works on class-index targets"):
            validate(cfg)
        cfg = compose("config", overrides=["task=regression"])
        with pytest.raises(ConfigError, match="checkpoint.monitor='val/acc': evaluation logs only val/loss, val/mae"):
            validate(cfg)


# ---- through the CLI: each task trains on real data ------------------------------------------------------------

def user_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run_task(tmp_path, *args, check=True):

    cmd = [sys.executable, "-m", "trainrun", "logger.progress=lines", "logger.log_every=5", "logger.plots=false",
           *args]
    p = trainrun_process(cmd[3:], tmp_path, {**user_env(), "WANDB_MODE": "disabled"})
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.mark.parametrize("task,data,monitor,model,floor", [
    ("binary", "userpkg.data.digits_binary", "val/f1", "model=mlp", ("val/acc", 0.85)),
    ("multilabel", "userpkg.data.digits_multilabel", "val/f1", "model=mlp", ("val/acc", 0.8)),
    ("regression", "userpkg.data.diabetes", "val/r2", "model._target_=userpkg.nets.regressor", ("val/r2", 0.3)),
])
def test_each_task_trains_through_the_cli(tmp_path, task, data, monitor, model, floor):
    p = run_task(tmp_path, f"task={task}", f"data._target_={data}", f"checkpoint.monitor={monitor}", model,
                 "run_name=t", "trainer.max_steps=40", "trainer.eval_every=20", "optimizer.lr=0.005",
                 "data.batch_size=32")
    evals = [r for r in read_jsonl(tmp_path / "runs/t/metrics.jsonl") if monitor in r]
    assert len(evals) == 2 and evals[-1][floor[0]] > floor[1], evals
    assert f"task: {task}" in p.stdout
    meta = json.loads((tmp_path / "runs/t/checkpoints/step_000000040/meta.json").read_text())
    assert meta["config"]["resolved"]["task"]["name"] == task
    assert meta["user_code"]["data"]["target"] == data


def test_task_metrics_reduce_across_ranks_as_one_process_computes_them(tmp_path):
    """2 gloo ranks x batch 16 log the same train/mae and val/* as one process with batch 32 (the sums are
    all-reduced, not the per-rank means averaged)."""
    import subprocess

    common = ["task=regression", "data._target_=userpkg.data.diabetes", "checkpoint.monitor=val/r2",
              "model._target_=userpkg.nets.regressor", "optimizer=sgd", "optimizer.lr=0.05", "trainer.max_steps=10",
              "trainer.eval_every=5", "trainer.device=cpu", "logger.progress=lines", "logger.log_every=5",
              "logger.plots=false"]
    env = {**user_env(), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "trainrun", "run_name=ddp", "data.batch_size=16", *common], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = trainrun_process(["run_name=one", "data.batch_size=32", *common], tmp_path, env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {name: read_jsonl(tmp_path / f"runs/{name}/metrics.jsonl") for name in ("ddp", "one")}
    for key in ("train/mae", "train/loss", "val/mae", "val/r2"):
        a = [r[key] for r in rows["ddp"] if key in r]
        b = [r[key] for r in rows["one"] if key in r]
        assert len(a) == 2 and a == pytest.approx(b, rel=1e-5), key


def test_classification_calls_plain_cross_entropy_directly_with_the_same_result():
    """The task calls F.cross_entropy itself for a plain nn.CrossEntropyLoss (bitwise the module's value, for class
    indices and MixUp's probability targets, with label smoothing and ignore_index) and the module itself
    otherwise (class weights, hooks), and follows a replaced loss_fn."""
    from trainrun.regularization import WeightedCrossEntropy
    from trainrun.tasks.classification import direct_loss

    torch.manual_seed(0)
    logits, y = torch.randn(16, 5, dtype=torch.bfloat16), torch.randint(0, 5, (16,))
    y[3] = -100
    probs = torch.softmax(torch.randn(16, 5), 1)
    for module in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100),
                   nn.CrossEntropyLoss(reduction="sum")):
        task = Classification(None, module, (5,))
        assert not isinstance(direct_loss(module), nn.Module)
        for target in (y, probs):
            if target is y or module.reduction == "mean":
                t = target if target is probs or module.ignore_index == -100 else target.clamp(min=0)
                assert torch.equal(task.loss(logits, t), module(logits.float(), t))
    weighted = WeightedCrossEntropy(weight=torch.rand(5))
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert direct_loss(weighted) is weighted and direct_loss(hooked) is hooked
    task = Classification(None, nn.CrossEntropyLoss(), (5,))
    plain = task.loss(logits, y.clamp(min=0))
    task.loss_fn = hooked
    assert torch.equal(task.loss(logits, y.clamp(min=0)), plain * 2)
