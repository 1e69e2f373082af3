"""Multiclass classification: integer labels 0..C-1, one logit per class; CE / focal, label smoothing, class
weights, MixUp/CutMix targets. Metrics: loss and accuracy (the arg-max of the logits)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from trainrun.errors import DataError
from trainrun.tasks import TASKS, Task


@TASKS.register("classification", doc="one label of C classes per sample: cross-entropy (or focal), accuracy")
class Classification(Task):
    name = "classification"
    mixes_targets = True
    classifies = True

    @staticmethod
    def metric_names(cfg) -> Tuple[str, ...]:
        return ("loss", "acc")

    def output_meaning(self) -> str:
        return "one logit per class"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output.float(), target)  # target: class indices, or probabilities after MixUp/CutMix

    def train_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"correct": (output.detach().argmax(1) == target).sum()}

    def train_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"train/acc": float(sums["correct"]) / max(1, n)}

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(output.float(), target, reduction="sum").double(),
                "correct": (output.argmax(1) == target).sum()}

    def eval_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"val/loss": float(sums["loss"]) / max(1, n), "val/acc": float(sums["correct"]) / max(1, n)}

    def initial_loss(self) -> Optional[float]:
        return math.log(self.num_outputs)

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.is_floating_point() or y.is_complex() or y.ndim != 1:
            raise DataError(f"{what}: task=classification needs one integer class index per sample, got {y.dtype} "
                            f"targets of shape {list(y.shape[1:])} per sample; use task=binary, multilabel or "
                            "regression for other targets")
