"""Evaluation metrics on torchmetrics: each metric against scikit-learn or a hand computation on a fixed batch,
the names validation accepts, the confusion-matrix / reliability PNGs, and through the CLI: a non-accuracy monitor
selects the best checkpoint, and 2 gloo ranks log exactly the one-process values."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FAST, read_jsonl, run_cli, structured
from trainrun.config import TaskConfig
from trainrun.errors import ConfigError
from trainrun.tasks.classification import Classification
from trainrun.tasks.regression import Regression
from trainrun.tasks.sigmoid import Binary, Multilabel

EXTRAS = ["top3", "f1_macro", "f1_micro", "auroc", "ece", "per_class_acc"]


def task_cfg(**values):
    return structured(TaskConfig, **values)


def fixed_batch(n=120, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) + 1.5 * F.one_hot(y, classes)  # better than chance, not perfect
    return logits, y


def in_batches(task, output, target, size=32):
    """The evaluation as the loop runs it: one accumulator updated batch by batch."""
    evaluation = task.evaluation()
    for i in range(0, len(target), size):
        evaluation.update(output[i:i + size], target[i:i + size])
    return evaluation


def in_halves(task, output, target):
    half = len(target) // 2
    a, b = task.eval_sums(output[:half], target[:half]), task.eval_sums(output[half:], target[half:])
    return task.eval_metrics({k: a[k] + b[k] for k in a}, len(target))


def ece_by_hand(confidence, correct, bins=15):
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        inside = [(c, a) for c, a in zip(confidence, correct) if lo <= c < hi or (i == bins - 1 and c == 1.0)]
        if inside:
            mean_conf = sum(c for c, _ in inside) / len(inside)
            mean_acc = sum(a for _, a in inside) / len(inside)
            total += abs(mean_acc - mean_conf) * len(inside) / len(confidence)
    return total


def test_classification_metrics_match_scikit_learn_and_hand_computation():
    from sklearn.metrics import f1_score, recall_score, roc_auc_score, top_k_accuracy_score

    logits, y = fixed_batch()
    names = ["cat", "dog", "eel", "fox", "gnu"]
    task = Classification(task_cfg(metrics=EXTRAS), nn.CrossEntropyLoss(), (5,), class_names=names)
    got = in_batches(task, logits, y).compute()
    probs, pred = logits.softmax(1), logits.argmax(1)
    assert got["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert got["val/acc"] == (pred == y).sum().item() / len(y)  # exact: the counts divided in float64
    assert got["val/top3"] == pytest.approx(top_k_accuracy_score(y, probs, k=3, labels=range(5)), abs=1e-6)
    assert got["val/f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert got["val/f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-6)
    assert got["val/auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-5)
    confidence, top = probs.max(1)
    assert got["val/ece"] == pytest.approx(ece_by_hand(confidence.tolist(), (top == y).float().tolist()), abs=1e-6)
    for name, acc in zip(names, recall_score(y, pred, average=None)):
        assert got[f"val/acc/{name}"] == pytest.approx(acc, abs=1e-12)
    assert 0.3 < got["val/acc"] < 0.95 and got["val/f1_macro"] != got["val/acc"]  # a batch that tells them apart
    assert in_halves(task, logits, y) == pytest.approx(got, rel=1e-6)  # the states add up as sums did
    assert in_batches(task, logits, y).reliability()["ece"] == pytest.approx(got["val/ece"], abs=1e-6)


def test_per_class_accuracy_without_class_names_uses_indices_and_nan_for_an_absent_class():
    logits, y = fixed_batch(classes=4)
    y[y == 2] = 1  # class 2 never occurs
    task = Classification(task_cfg(metrics=["per_class_acc"]), nn.CrossEntropyLoss(), (4,))
    got = in_batches(task, logits, y).compute()
    assert set(got) == {"val/loss", "val/acc", "val/acc/0", "val/acc/1", "val/acc/2", "val/acc/3"}
    assert got["val/acc/2"] != got["val/acc/2"]
    pred = logits.argmax(1)
    assert got["val/acc/0"] == ((pred == 0) & (y == 0)).sum().item() / (y == 0).sum().item()


def test_binary_auroc_and_ece_match_scikit_learn_and_hand_computation():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 2, (90,), generator=g)
    out = (torch.randn(90, generator=g) + 1.2 * (2 * y - 1)).unsqueeze(1)
    task = Binary(task_cfg(name="binary", metrics=["auroc", "ece"]), nn.BCEWithLogitsLoss(), (1,))
    got = in_batches(task, out, y).compute()
    p = torch.sigmoid(out.flatten())
    assert got["val/auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    # binary ECE (torchmetrics): the positive-class probability against the share of positives in each bin
    assert got["val/ece"] == pytest.approx(ece_by_hand(p.tolist(), y.float().tolist()), abs=1e-6)
    assert got["val/acc"] == ((p > 0.5).long() == y).sum().item() / 90


def test_multilabel_auroc_is_the_macro_average_of_scikit_learn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (60, 3), generator=g).float()
    out = torch.randn(60, 3, generator=g) + (2 * y - 1)
    task = Multilabel(task_cfg(name="multilabel", metrics=["auroc"]), nn.BCEWithLogitsLoss(), (3,))
    got = in_batches(task, out, y, size=16).compute()
    assert got["val/auroc"] == pytest.approx(roc_auc_score(y, torch.sigmoid(out), average="macro"), abs=1e-6)


def test_regression_metrics_in_batches_and_r2_of_one_sample():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    g = torch.Generator().manual_seed(6)
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    out = y + 0.3 * torch.randn(50, 2, generator=g, dtype=torch.float64)
    task = Regression(task_cfg(name="regression"), nn.MSELoss(), (2,))
    got = in_batches(task, out, y, size=7).compute()
    assert got["val/mae"] == pytest.approx(mean_absolute_error(y, out), rel=1e-9)
    assert got["val/rmse"] == pytest.approx(mean_squared_error(y, out) ** 0.5, rel=1e-9)
    assert got["val/r2"] == pytest.approx(r2_score(y, out), rel=1e-9)
    one = in_batches(task, out[:1], y[:1]).compute()
    assert one["val/r2"] != one["val/r2"] and one["val/mae"] == pytest.approx((out[0] - y[0]).abs().mean().item())


def test_a_user_task_defined_by_sums_is_still_evaluated_from_its_sums():
    from trainrun.config import PrecisionConfig
    from trainrun.data import BatchStream, TensorSet
    from trainrun.loop import evaluate
    from trainrun.precision import PrecisionPolicy
    from trainrun.tasks import Task

    class Peak(Task):
        def eval_sums(self, output, target):
            return {"loss": (output.squeeze(1) - target).abs().sum().double(), "peak": output.max().double()}

        def eval_metrics(self, sums, n):
            return {"val/loss": float(sums["loss"]) / n, "val/peaks": float(sums["peak"])}

    x, y = torch.arange(10.0).reshape(10, 1), torch.zeros(10)
    stream = BatchStream(TensorSet(x, y), 4, 0, shuffle=False, drop_last=False)
    got = evaluate(nn.Identity(), stream, PrecisionPolicy(structured(PrecisionConfig), torch.device("cpu")),
                   torch.device("cpu"), task=Peak(None, nn.L1Loss(), (1,)))
    assert got == {"val/loss": 4.5, "val/peaks": 3.0 + 7.0 + 9.0}  # the batches' sums added, as before


# ---- names: what validation accepts -----------------------------------------------------------------------------

def composed(*overrides):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides,words", [
    (["task.metrics=[f1_macro,bogus]"], "task.metrics=['f1_macro', 'bogus']: unknown metric 'bogus' for "
                                        "task=classification; valid: top<k>, f1_macro, f1_micro, auroc, ece, "
                                        "per_class_acc"),
    (["task.metrics=[top1]"], "top-1 accuracy is val/acc already"),
    (["task=regression", "checkpoint.monitor=val/r2", "task.metrics=[auroc]"], "valid: none"),
    (["task=multilabel", "checkpoint.monitor=val/f1", "task.metrics=[ece]"], "valid: auroc"),
    (["checkpoint.monitor=val/f1_macro"], "checkpoint.monitor='val/f1_macro': evaluation logs only val/loss, val/acc"),
])
def test_unknown_metrics_and_unlogged_monitors_are_refused_before_training(overrides, words):
    from trainrun.config import validate

    with pytest.raises(ConfigError) as e:
        validate(composed(*overrides))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_every_extra_metric_can_be_the_monitor():
    from trainrun.config import validate
    from trainrun.tasks import metric_names

    cfg = composed("task.metrics=[top5,f1_macro,auroc,ece]", "checkpoint.monitor=val/ece",
                   "checkpoint.monitor_mode=min", "regularization.ema_decay=0.9")
    validate(cfg)
    assert metric_names(cfg) == ("val/loss", "val/acc", "val/top5", "val/f1_macro", "val/auroc", "val/ece")
    cfg.checkpoint.monitor = "val_raw/auroc"
    validate(cfg)


def test_top_k_larger_than_the_classes_is_refused_when_the_task_is_built():
    from types import SimpleNamespace

    from trainrun.tasks.build import build_task

    cfg = composed("task.metrics=[top12]")
    split = SimpleNamespace(num_classes=10, train=SimpleNamespace(y=torch.arange(10)),
                            val=SimpleNamespace(y=torch.arange(10)))
    with pytest.raises(ConfigError, match=r"top12 needs at least 12 classes, the data has 10; use k <= 10"):
        build_task(cfg, split, torch.device("cpu"))


# ---- plots ---------------------------------------------------------------------------------------------------------

def _nontrivial_png(path, min_colours=20):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    assert image.width > 300 and image.height > 300
    return len(image.getcolors(1 << 24)) >= min_colours  # text, colours, bars: not a blank canvas


def test_confusion_matrix_and_reliability_pngs(tmp_path):
    from trainrun.plots import plot_evaluation

    logits, y = fixed_batch(n=400, classes=10, seed=7)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    task = Classification(task_cfg(metrics=["ece"]), nn.CrossEntropyLoss(), (10,), class_names=names)
    evaluation = in_batches(task, logits, y)
    confusion = evaluation.confusion_matrix()
    assert confusion.sum() == 400 and confusion.trace() == (logits.argmax(1) == y).sum()
    assert confusion[3, 5] == ((y == 3) & (logits.argmax(1) == 5)).sum()  # rows: true class, columns: predicted
    written = plot_evaluation(tmp_path, evaluation, title="digits")
    assert [p.name for p in written] == ["confusion_matrix.png", "reliability.png"]
    assert all(_nontrivial_png(p) for p in written)
    plain = Classification(task_cfg(), nn.CrossEntropyLoss(), (10,))
    assert [p.name for p in plot_evaluation(tmp_path / "plain", in_batches(plain, logits, y))] == \
        ["confusion_matrix.png"]  # no ECE measured: no reliability diagram
    g = torch.Generator().manual_seed(8)
    yb = torch.randint(0, 2, (200,), generator=g)
    binary = Binary(task_cfg(name="binary", metrics=["ece"]), nn.BCEWithLogitsLoss(), (1,))
    out = torch.randn(200, 1, generator=g) + (2 * yb - 1).unsqueeze(1).float()
    written = plot_evaluation(tmp_path / "b", in_batches(binary, out, yb))
    assert [p.name for p in written] == ["reliability.png"] and _nontrivial_png(written[0])
    regression = Regression(task_cfg(name="regression"), nn.MSELoss(), ())
    assert plot_evaluation(tmp_path / "r", in_batches(regression, y.float(), y.float())) == []
    assert plot_evaluation(tmp_path / "none", None) == []


# ---- through the CLI ---------------------------------------------------------------------------------------------

def torchrun(cwd, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainrun",
           *args, *FAST, "trainer.device=cpu"]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_f1_monitor_selects_the_best_checkpoint_and_two_ranks_evaluate_as_one(tmp_path):
    """monitor=val/f1_macro: the `best` pointer and its monitor_value follow val/f1_macro in metrics.jsonl. Then
    mode=eval of that run on 2 gloo ranks (each rank measures the whole val set, nothing is synced) gives exactly
    the one-process values of every metric."""
    run_cli(tmp_path, "run_name=f1", "model=mlp", "trainer.max_steps=30", "trainer.eval_every=10",
            "trainer.ckpt_every=10", "checkpoint.keep_last=5", "data.batch_size=32", "optimizer.lr=0.003",
            f"task.metrics=[{','.join(EXTRAS)}]", "checkpoint.monitor=val/f1_macro", *FAST)
    run = tmp_path / "runs/f1"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val/f1_macro" in r]
    assert len(evals) == 3 and all(f"val/acc/{c}" in evals[0] for c in range(10))
    best = max(evals, key=lambda r: r["val/f1_macro"])
    from trainrun.checkpoint import read_meta, read_pointer

    meta = read_meta(read_pointer(run, "best"))
    assert meta["step"] == best["step"] and meta["monitor_value"] == best["val/f1_macro"] != best["val/acc"]

    run_cli(tmp_path, "mode=eval", "resume=runs/f1", *FAST)
    torchrun(tmp_path, "mode=eval", "resume=runs/f1")
    results = sorted(run.glob("eval/*/eval.json"), key=lambda p: p.stat().st_mtime)
    one, two = (json.loads(p.read_text()) for p in results[:1] + results[-1:])
    assert len(results) >= 2 and {k: v for k, v in one.items() if k.startswith("val/")} == \
        {k: v for k, v in two.items() if k.startswith("val/")}
    assert one["val/f1_macro"] == evals[-1]["val/f1_macro"]  # eval of the latest checkpoint = its logged eval
