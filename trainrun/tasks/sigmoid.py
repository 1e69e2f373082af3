"""Binary and multilabel classification: one independent sigmoid per label, BCE-with-logits (`task.pos_weight`
weighs positives), a positive prediction where sigmoid(logit) > task.threshold. Metrics (trainrun.metrics,
torchmetrics): loss, accuracy (per label), precision, recall and F1 (micro-averaged over labels); `task.metrics`
adds AUROC and (binary) ECE."""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch

from trainrun.errors import DataError
from trainrun.tasks import TASKS, MeasuredTask


class SigmoidTask(MeasuredTask):
    def output_meaning(self) -> str:
        return "one logit per label"

    @classmethod
    def metric_names(cls, task_cfg) -> Tuple[str, ...]:
        from trainrun.metrics import logged_names

        return logged_names(cls.name, list(task_cfg.get("metrics") or ()) if task_cfg is not None else ())

    def shape_output(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.reshape(target.shape)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.shape_output(output.float(), target), target.float())

    def _cut(self) -> float:
        """The logit above which a prediction is positive: sigmoid(z) > t  <=>  z > logit(t)."""
        t = self.cfg.threshold
        return math.log(t / (1 - t)) if 0 < t < 1 else (math.inf if t >= 1 else -math.inf)

    def train_sums(self, output, target):
        predicted = self.shape_output(output.detach().float(), target) > self._cut()
        return {"correct": (predicted == (target > 0.5)).sum()}

    def train_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"train/acc": float(sums["correct"]) / max(1, n * self.num_outputs)}

    def evaluation(self):
        from trainrun.metrics import SigmoidMetrics

        return SigmoidMetrics(self.name, self._cut(), self.extra_metrics(), self._summed_loss, self.num_outputs)

    def _summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.shape_output(output.float(), target), target.float()).double() * len(target)

    def initial_loss(self):
        return math.log(2.0)  # BCE of a zero logit

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.is_complex() or not bool(((y == 0) | (y == 1)).all()):
            bad = y[(y != 0) & (y != 1)][:3].tolist() if not y.is_complex() else "complex values"
            raise DataError(f"{what}: task={self.name} needs targets of 0 and 1, found {bad}; map the labels to 0/1 "
                            "(or use task=classification for class indices)")


@TASKS.register("binary", doc="one yes/no label per sample: one logit, BCE-with-logits, accuracy/precision/recall/F1")
class Binary(SigmoidTask):
    name = "binary"

    def accepted_output_shapes(self) -> Sequence[Tuple[int, ...]]:
        return ((), (1,))

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
            raise DataError(f"{what}: task=binary needs one 0/1 target per sample, got shape {list(y.shape[1:])} per "
                            "sample; use task=multilabel for several labels per sample")
        super().check_targets(y, what)


@TASKS.register("multilabel", doc="several yes/no labels per sample (multi-hot targets): one logit per label, BCE")
class Multilabel(SigmoidTask):
    name = "multilabel"

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.ndim != 2:
            raise DataError(f"{what}: task=multilabel needs a multi-hot vector of 0/1 per sample ([N, labels]), got "
                            f"shape {list(y.shape)}; use task=binary for one label per sample")
        super().check_targets(y, what)
