"""Multiclass classification: integer labels 0..C-1, one logit per class; CE / focal, label smoothing, class
weights, MixUp/CutMix targets. Metrics (trainrun.metrics, torchmetrics): loss and accuracy (the arg-max of the
logits); `task.metrics` adds top-k accuracy, macro/micro F1, AUROC, ECE and per-class accuracy."""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from trainrun.errors import DataError
from trainrun.tasks import TASKS, MeasuredTask


def direct_loss(loss_fn):
    """A plain nn.CrossEntropyLoss as the F.cross_entropy call its forward makes (the same op, without the
    module call's ~1 % of a small model's step); any other loss as itself."""
    if type(loss_fn) is torch.nn.CrossEntropyLoss and loss_fn.weight is None and not (
            loss_fn._forward_hooks or loss_fn._forward_pre_hooks):
        return functools.partial(F.cross_entropy, ignore_index=loss_fn.ignore_index, reduction=loss_fn.reduction,
                                 label_smoothing=loss_fn.label_smoothing)
    return loss_fn


@TASKS.register("classification", doc="one label of C classes per sample: cross-entropy (or focal), accuracy")
class Classification(MeasuredTask):
    name = "classification"
    mixes_targets = True
    classifies = True

    @staticmethod
    def metric_names(task_cfg) -> Tuple[str, ...]:
        from trainrun.metrics import logged_names

        return logged_names("classification", list(task_cfg.get("metrics") or ()) if task_cfg is not None else ())

    def output_meaning(self) -> str:
        return "one logit per class"

    _direct: Tuple = (None, None)  # (loss_fn, the function `loss` calls for it)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        owner, fn = self._direct
        if owner is not self.loss_fn:
            owner, fn = self._direct = (self.loss_fn, direct_loss(self.loss_fn))
        return fn(output.float(), target)  # target: class indices, or probabilities after MixUp/CutMix

    def train_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"correct": (output.detach().argmax(1) == target).sum()}

    def train_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"train/acc": float(sums["correct"]) / max(1, n)}

    def evaluation(self):
        from trainrun.metrics import ClassificationMetrics

        return ClassificationMetrics(self.extra_metrics(), _summed_cross_entropy, self.output_shape[0] if
                                     self.output_shape else None, self.class_names)

    def initial_loss(self) -> Optional[float]:
        return math.log(self.num_outputs)

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.is_floating_point() or y.is_complex() or y.ndim != 1:
            raise DataError(f"{what}: task=classification needs one integer class index per sample, got {y.dtype} "
                            f"targets of shape {list(y.shape[1:])} per sample; use task=binary, multilabel or "
                            "regression for other targets")


def _summed_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The evaluation loss: cross-entropy without the run's smoothing or class weights, summed in float64."""
    return F.cross_entropy(output.float(), target, reduction="sum").double()
