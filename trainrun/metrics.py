"""Evaluation metrics on torchmetrics: which names each task logs, and the accumulator of one evaluation pass.

Every task logs its base metrics (`val/loss` and, by task, `val/acc`, `val/precision`, ... `val/mae`, `val/r2`);
`task.metrics` adds more (EXTRAS). An `Evaluation` holds one torchmetrics `MetricCollection` per kind of input
(logits, probabilities, hard labels, values), updated batch by batch and computed once at the end.

Exactness: the loss is summed in float64 as before, and the count-based base metrics (accuracy, precision, recall,
F1 of the sigmoid tasks) are divided in float64 from torchmetrics' integer counts (its own `compute` divides in
float32), so the logged values - and the checkpoints that store them - do not move. Every rank evaluates the whole
validation set, so the metrics are built with `sync_on_compute=False`: each rank computes the one-process values.

torchmetrics is imported inside the functions: importing it costs seconds, and validation and `import trainrun`
must stay cheap.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from trainrun.errors import ConfigError

ECE_BINS = 15
BASE = {"classification": ("loss", "acc"), "binary": ("loss", "acc", "precision", "recall", "f1"),
        "multilabel": ("loss", "acc", "precision", "recall", "f1"), "regression": ("loss", "mae", "rmse", "r2")}
# task.metrics entries each task accepts ("top<k>" is a pattern: classification's top-k accuracy, k >= 2)
EXTRAS = {"classification": ("top<k>", "f1_macro", "f1_micro", "auroc", "ece", "per_class_acc"),
          "binary": ("auroc", "ece"), "multilabel": ("auroc",), "regression": ()}
EXTRA_DOCS = {"top<k>": "top-k accuracy, e.g. top5 -> val/top5", "f1_macro": "F1 averaged over classes",
              "f1_micro": "F1 over all samples", "auroc": "area under the ROC curve (macro, one-vs-rest)",
              "ece": f"expected calibration error ({ECE_BINS} bins) and a reliability diagram",
              "per_class_acc": "accuracy of each class -> val/acc/<class>"}
_TOP_K = re.compile(r"top([0-9]+)$")
LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> the batch's summed loss


def top_k(name: str) -> Optional[int]:
    match = _TOP_K.match(name)
    return int(match.group(1)) if match else None


def extras_problem(task_name: str, extras: Sequence[str]) -> Optional[str]:
    """Why `task.metrics` cannot be computed for `task_name` (None when every entry is valid)."""
    valid = EXTRAS.get(task_name)
    if valid is None:
        return f"task={task_name} computes its own metrics; drop task.metrics" if extras else None
    for name in extras:
        k = top_k(name)
        if k is not None and "top<k>" in valid:
            if k < 2:
                return f"{name!r}: top-1 accuracy is val/acc already; use k >= 2 (e.g. top5)"
            continue
        if name not in valid:
            listed = ", ".join(valid) if valid else "none (its metrics are always " + ", ".join(BASE[task_name]) + ")"
            return f"unknown metric {name!r} for task={task_name}; valid: {listed}"
    return None


def check_fits_outputs(task_name: str, extras: Sequence[str], size: int) -> None:
    """Refuse, before training, a top-k larger than the number of classes the data has."""
    for name in extras:
        k = top_k(name)
        if task_name == "classification" and k is not None and k > size:
            raise ConfigError(f"task.metrics={list(extras)}: {name} needs at least {k} classes, the data has {size}; "
                              f"use k <= {size}")


def class_labels(class_names: Optional[Sequence[str]], size: int) -> List[str]:
    """What names each class on axes and in `val/acc/<class>`: the data's class names, else 0..C-1."""
    if class_names is not None and len(class_names) == size:
        return [str(c).replace("/", "_") for c in class_names]
    return [str(i) for i in range(size)]


def logged_names(task_name: str, extras: Sequence[str], class_names: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The names (without `val/`) evaluation logs. Per-class accuracies need the class names, known from the data
    only: without them `per_class_acc` adds nothing here (its entries cannot be a monitor)."""
    names = list(BASE.get(task_name, ("loss",)))
    for name in dict.fromkeys(extras):
        if name == "per_class_acc":
            names += [f"acc/{c}" for c in class_labels(class_names, len(class_names or ()))]
        else:
            names.append(name)
    return tuple(names)


class Evaluation:
    """One evaluation pass: `update(output, target)` per batch, `compute()` once -> {"val/...": float}.

    Subclasses say which torchmetrics metrics measure the task (`_metrics`), what each kind of input is (`_inputs`)
    and how the computed tensors become logged values (`_values`). `state()` / `merge()` expose the metrics' states
    so evaluations of separate batches add up as the task's sums did (Task.eval_sums / eval_metrics)."""
    task_name = "task"

    def __init__(self, extras: Sequence[str], loss_sum: LossSum, size: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None):
        self.extras = tuple(dict.fromkeys(extras or ()))
        self.loss_sum, self.class_names = loss_sum, class_names
        self.loss = torch.zeros((), dtype=torch.float64)
        self.n = 0
        self.size = size
        self.collections = self._build(size) if size is not None else None

    def _build(self, size: int) -> Dict[str, Any]:
        from torchmetrics import MetricCollection

        return {kind: MetricCollection(metrics, compute_groups=False) for kind, metrics in self._metrics(size).items()
                if metrics}

    def _metrics(self, size: int) -> Dict[str, Dict[str, Any]]:
        raise NotImplementedError

    def _inputs(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _values(self, computed: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, float]:
        raise NotImplementedError

    def _compute(self, name: str, metric) -> torch.Tensor:
        return metric.compute()

    def _size_of(self, output: torch.Tensor, target: torch.Tensor) -> int:
        return output.reshape(len(output), -1).shape[1]

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.collections is None:
            self.size = self._size_of(output, target)
            self.collections = self._build(self.size)
        if self.loss.device != output.device:  # the first batch: the states live where the outputs are
            self.loss = self.loss.to(output.device)
            self.collections = {kind: c.to(output.device) for kind, c in self.collections.items()}
        self.loss = self.loss + self.loss_sum(output, target)
        self.n += len(target)
        for kind, (preds, truth) in self._inputs(output, target).items():
            if kind in self.collections:
                self.collections[kind].update(preds, truth)

    def compute(self) -> Dict[str, float]:
        if self.n == 0 or self.collections is None:  # an empty stream
            return {f"val/{name}": float("nan") for name in logged_names(self.task_name, self.extras)
                    if not name.startswith("acc/")}
        with warnings.catch_warnings():
            # states merged from eval_sums count no update() calls: torchmetrics would warn about that
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            computed = {kind: {name: self._compute(name, metric) for name, metric in collection.items()}
                        for kind, collection in self.collections.items()}
        return {"val/loss": float(self.loss) / self.n, **self._values(computed)}

    def state(self) -> Dict[str, Any]:
        """Every state, flat: tensors that add up and lists that concatenate (`+`) across batches."""
        flat: Dict[str, Any] = {"loss": self.loss, "n": torch.tensor(self.n)}
        for kind, collection in (self.collections or {}).items():
            for name, metric in collection.items():
                for attr, value in metric.metric_state.items():
                    flat[f"{kind}.{name}.{attr}"] = list(value) if isinstance(value, list) else value
        return flat

    def merge(self, flat: Dict[str, Any]) -> None:
        """Add the states of `state()` (possibly summed over batches) into this evaluation."""
        self.loss, self.n = self.loss + flat["loss"].cpu(), self.n + int(flat["n"])
        for kind, collection in self.collections.items():
            for name, metric in collection.items():
                metric.merge_state({attr: flat[f"{kind}.{name}.{attr}"] for attr in metric.metric_state})

    def confusion_matrix(self) -> Optional[torch.Tensor]:
        """[true, predicted] counts (classification), None for other tasks or before any batch."""
        return None

    def reliability(self) -> Optional[Dict[str, torch.Tensor]]:
        """Per-bin confidence, accuracy and count of the ECE's bins when "ece" was measured, else None."""
        return None


def _common() -> Dict[str, Any]:
    return {"sync_on_compute": False}


def _float(value: torch.Tensor) -> float:
    return float(value.double())


def _ratio(num: float, den: float, empty: float = 0.0) -> float:
    return num / den if den else empty


class ClassificationMetrics(Evaluation):
    """loss, acc (top-1, from the confusion matrix's counts); extras top<k>, f1_macro/micro, auroc, ece,
    per_class_acc. Logits feed the label metrics, softmax probabilities AUROC and ECE (torchmetrics would skip its
    own softmax when every logit happens to lie in [0, 1])."""
    task_name = "classification"

    def _metrics(self, size: int) -> Dict[str, Dict[str, Any]]:
        from torchmetrics.classification import (MulticlassAccuracy, MulticlassAUROC, MulticlassCalibrationError,
                                                 MulticlassConfusionMatrix, MulticlassF1Score)

        common = {"num_classes": size, **_common()}
        logits: Dict[str, Any] = {"confmat": MulticlassConfusionMatrix(**common)}
        probs: Dict[str, Any] = {}
        for name in self.extras:
            if top_k(name) is not None:
                logits[name] = MulticlassAccuracy(top_k=top_k(name), average="micro", **common)
            elif name in ("f1_macro", "f1_micro"):
                logits[name] = MulticlassF1Score(average=name[3:], **common)
            elif name == "auroc":
                probs[name] = MulticlassAUROC(average="macro", thresholds=None, **common)
            elif name == "ece":
                probs[name] = MulticlassCalibrationError(n_bins=ECE_BINS, norm="l1", **common)
        return {"logits": logits, "probs": probs}

    def _inputs(self, output, target):
        logits = output.float()
        return {"logits": (logits, target), "probs": (logits.softmax(1), target)}

    def _values(self, computed):
        confmat = computed["logits"].pop("confmat").double()
        values = {"val/acc": _ratio(float(confmat.trace()), float(confmat.sum()))}
        for name in self.extras:
            if name == "per_class_acc":
                per_class = confmat.diagonal() / confmat.sum(1)  # nan for a class without samples
                for label, acc in zip(class_labels(self.class_names, self.size), per_class.tolist()):
                    values[f"val/acc/{label}"] = acc
            else:
                values[f"val/{name}"] = _float(computed["logits" if name in computed["logits"] else "probs"][name])
        return values

    def confusion_matrix(self):
        return None if self.collections is None else self.collections["logits"]["confmat"].confmat.cpu()

    def reliability(self):
        if self.collections is None or "ece" not in self.collections.get("probs", {}):
            return None
        state = self.collections["probs"]["ece"].metric_state
        return reliability_bins(_cat(state["confidences"]), _cat(state["accuracies"]))


def _cat(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.cpu()
    return torch.cat([v.reshape(-1) for v in values]).cpu() if values else torch.zeros(0)


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> Dict[str, torch.Tensor]:
    """torchmetrics' ECE bins ([i/bins, (i+1)/bins), a confidence of 1 in the last): mean confidence, accuracy
    and count per bin, the ECE (sum of |accuracy - confidence| weighted by the bin's share) and the bin edges."""
    confidence, correct = confidence.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(confidence))
    conf = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, confidence) / count.clamp_min(1)
    acc = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, correct) / count.clamp_min(1)
    ece = float(((acc - conf).abs() * count).sum() / count.sum().clamp_min(1))
    return {"confidence": conf, "accuracy": acc, "count": count, "edges": edges, "ece": torch.tensor(ece)}


class SigmoidMetrics(Evaluation):
    """binary / multilabel: loss, acc, precision, recall, F1 (micro over labels) from torchmetrics' stat scores of
    the thresholded predictions; extras auroc (macro over labels) and ece (binary) on the sigmoid probabilities."""

    def __init__(self, task_name: str, cut: float, *args, **kwargs):
        self.task_name, self.cut = task_name, cut  # sigmoid(z) > threshold  <=>  z > cut = logit(threshold)
        super().__init__(*args, **kwargs)

    def _metrics(self, size: int) -> Dict[str, Dict[str, Any]]:
        from torchmetrics.classification import (BinaryAUROC, BinaryCalibrationError, BinaryStatScores,
                                                 MultilabelAUROC, MultilabelStatScores)

        binary = self.task_name == "binary"
        labels = {"stats": BinaryStatScores(**_common()) if binary else
                  MultilabelStatScores(num_labels=size, average="micro", **_common())}
        probs: Dict[str, Any] = {}
        if "auroc" in self.extras:
            probs["auroc"] = BinaryAUROC(thresholds=None, **_common()) if binary else \
                MultilabelAUROC(num_labels=size, average="macro", thresholds=None, **_common())
        if "ece" in self.extras:
            probs["ece"] = BinaryCalibrationError(n_bins=ECE_BINS, norm="l1", **_common())
        return {"labels": labels, "probs": probs}

    def _inputs(self, output, target):
        logits = output.detach().float().reshape(len(target), -1)
        truth = (target > 0.5).long().reshape(len(target), -1)
        if self.task_name == "binary":
            logits, truth = logits.reshape(-1), truth.reshape(-1)
        return {"labels": ((logits > self.cut).long(), truth), "probs": (logits.sigmoid(), truth)}

    def _values(self, computed):
        tp, fp, tn, fn = (float(v) for v in computed["labels"]["stats"][:4])
        values = {"val/acc": _ratio(tp + tn, tp + fp + tn + fn), "val/precision": _ratio(tp, tp + fp),
                  "val/recall": _ratio(tp, tp + fn), "val/f1": _ratio(2 * tp, 2 * tp + fp + fn)}
        for name in self.extras:
            values[f"val/{name}"] = _float(computed["probs"][name])
        return values

    def reliability(self):
        if self.collections is None or "ece" not in self.collections.get("probs", {}):
            return None
        state = self.collections["probs"]["ece"].metric_state
        # binary calibration: the positive-class probability against the share of positives in each bin
        return {**reliability_bins(_cat(state["confidences"]), _cat(state["accuracies"])),
                "axes": ("P(positive)", "share of positives")}


class RegressionMetrics(Evaluation):
    """loss, MAE, RMSE over every output value, R^2 averaged uniformly over outputs (torchmetrics R2Score, as
    scikit-learn's r2_score), all in float64."""
    task_name = "regression"

    def _metrics(self, size: int) -> Dict[str, Dict[str, Any]]:
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

        metrics = {"mae": MeanAbsoluteError(**_common()), "rmse": MeanSquaredError(squared=False, **_common()),
                   "r2": R2Score(multioutput="uniform_average", **_common())}
        for metric in metrics.values():
            metric.set_dtype(torch.float64)
        return {"values": metrics}

    def _inputs(self, output, target):
        truth = target.double().reshape(len(target), -1)
        return {"values": (output.detach().double().reshape(truth.shape), truth)}

    def _compute(self, name: str, metric) -> torch.Tensor:
        if name == "r2" and self.n < 2:  # R^2 needs two samples (torchmetrics raises)
            return torch.tensor(float("nan"))
        return metric.compute()

    def _values(self, computed):
        return {f"val/{name}": _float(value) for name, value in computed["values"].items()}
