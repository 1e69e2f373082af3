"""Evaluation metrics: which names each task logs, and the accumulator of one evaluation pass.

Every task logs its base metrics (`val/loss` and, by task, `val/acc`, `val/precision`, ... `val/mae`, `val/r2`);
`task.metrics` adds more (EXTRAS), computed by torchmetrics. An `Evaluation` holds, per kind of input (logits,
probabilities, hard labels, values), the metrics that measure it, updated batch by batch and computed once.

Exactness: the loss is summed in float64, and the base metrics come from exact integer counts or float64 sums by
torch ops (ConfusionCounts, StatCounts, RegressionSums at the end of this module), divided in float64, so the logged
values - and the checkpoints that store them - do not move. Importing torchmetrics costs 3-5 s (it imports
torchvision, scipy and transformers when installed), so it is imported only when `task.metrics` asks for an extra.
Every rank evaluates the whole validation set, so the torchmetrics metrics are built with `sync_on_compute=False`:
each rank computes the one-process values.
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

    def _build(self, size: int) -> Dict[str, Dict[str, Any]]:
        return {kind: dict(metrics) for kind, metrics in self._metrics(size).items() if metrics}

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
            self.collections = {kind: {name: metric.to(output.device) for name, metric in c.items()}
                                for kind, c in self.collections.items()}
        self.loss = self.loss + self.loss_sum(output, target)
        self.n += len(target)
        for kind, (preds, truth) in self._inputs(output, target).items():
            for metric in self.collections.get(kind, {}).values():
                metric.update(preds, truth)

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
        if not self.extras:
            return {"logits": {"confmat": ConfusionCounts(size)}}
        from torchmetrics.classification import (MulticlassAccuracy, MulticlassAUROC, MulticlassCalibrationError,
                                                 MulticlassF1Score)

        common = {"num_classes": size, **_common()}
        logits: Dict[str, Any] = {"confmat": ConfusionCounts(size)}
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
        binary = self.task_name == "binary"
        labels = {"stats": StatCounts()}  # micro over labels, as torchmetrics' (Multilabel)StatScores
        probs: Dict[str, Any] = {}
        if not self.extras:
            return {"labels": labels, "probs": probs}
        from torchmetrics.classification import (BinaryAUROC, BinaryCalibrationError, MultilabelAUROC)

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
        return {"values": {"errors": RegressionSums(size)}}

    def _inputs(self, output, target):
        truth = target.double().reshape(len(target), -1)
        return {"values": (output.detach().double().reshape(truth.shape), truth)}

    def _values(self, computed):
        return {f"val/{name}": _float(value) for name, value in computed["values"]["errors"].items()}


# --- the base metrics' exact counts, by torch ops ---------------------------------------------------------------
# Importing torchmetrics costs 3-5 s (it imports torchvision, scipy and transformers when they are installed): a
# run that asks for no extra metric computes its base metrics from these counts and never imports it. Each keeps
# the small Metric interface the evaluation uses: update / compute / to / metric_state / merge_state.

class _Summed:
    """One tensor that adds up over batches (and over evaluations merged with `merge_state`)."""
    state_name = "total"

    def __init__(self, total: torch.Tensor):
        self.total = total

    def to(self, device) -> "_Summed":
        self.total = self.total.to(device)
        return self

    def compute(self):
        return self.total

    @property
    def metric_state(self) -> Dict[str, torch.Tensor]:
        return {self.state_name: self.total}

    def merge_state(self, state: Dict[str, torch.Tensor]) -> None:
        self.total = self.total + state[self.state_name].to(self.total.device)


class ConfusionCounts(_Summed):
    """[true, predicted] counts of argmax predictions, as torchmetrics' MulticlassConfusionMatrix."""
    state_name = "confmat"

    def __init__(self, num_classes: int):
        super().__init__(torch.zeros(num_classes, num_classes, dtype=torch.long))
        self.num_classes = num_classes

    @property
    def confmat(self) -> torch.Tensor:
        return self.total

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes
        cells = target.long() * k + logits.argmax(1)
        self.total += torch.bincount(cells, minlength=k * k).reshape(k, k)


class StatCounts(_Summed):
    """[tp, fp, tn, fn, support] over every 0/1 prediction, as torchmetrics' Binary/Multilabel StatScores (micro)."""
    state_name = "counts"

    def __init__(self):
        super().__init__(torch.zeros(5, dtype=torch.long))

    def update(self, preds: torch.Tensor, truth: torch.Tensor) -> None:
        p, t = preds.bool(), truth.bool()
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        tn = p.numel() - tp - fp - fn
        self.total += torch.stack([tp, fp, tn, fn, tp + fn])


class RegressionSums(_Summed):
    """MAE, RMSE over every output value and R^2 averaged uniformly over outputs (scikit-learn's r2_score: a
    constant target scores 1 if predicted exactly, else 0), from float64 sums."""
    state_name = "sums"

    def __init__(self, size: int):
        super().__init__(torch.zeros(5, size, dtype=torch.float64))  # abs err, sq err, y, y^2, count per output

    def update(self, pred: torch.Tensor, truth: torch.Tensor) -> None:
        err = pred - truth
        self.total += torch.stack([err.abs().sum(0), (err * err).sum(0), truth.sum(0), (truth * truth).sum(0),
                                   torch.full_like(truth[0], len(truth))])

    def compute(self) -> Dict[str, torch.Tensor]:
        abs_err, sq_err, y, y2, n = self.total
        total = n.sum()
        ss_tot = y2 - y * y / n.clamp_min(1)
        exact = torch.where(sq_err == 0, torch.ones_like(sq_err), torch.zeros_like(sq_err))
        r2 = torch.where(ss_tot > 0, 1 - sq_err / ss_tot.clamp_min(1e-300), exact)
        return {"mae": abs_err.sum() / total, "rmse": (sq_err.sum() / total).sqrt(),
                "r2": r2.mean() if float(n[0]) >= 2 else torch.tensor(float("nan"), dtype=torch.float64)}
