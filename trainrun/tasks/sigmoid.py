"""Binary and multilabel classification: one independent sigmoid per label, BCE-with-logits (`task.pos_weight`
weighs positives), a positive prediction where sigmoid(logit) > task.threshold. Metrics: loss, accuracy (per
label), precision, recall and F1 (micro-averaged over labels), from counts that add up across batches and ranks."""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch

from trainrun.errors import DataError
from trainrun.tasks import TASKS, Task


class SigmoidTask(Task):
    def output_meaning(self) -> str:
        return "one logit per label"

    @staticmethod
    def metric_names(cfg) -> Tuple[str, ...]:
        return ("loss", "acc", "precision", "recall", "f1")

    def shape_output(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.reshape(target.shape)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.shape_output(output.float(), target), target.float())

    def _counts(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        threshold = self.cfg.threshold
        cut = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (math.inf if threshold >= 1 else -math.inf)
        predicted = self.shape_output(output.detach().float(), target) > cut  # sigmoid(z) > t  <=>  z > logit(t)
        actual = target > 0.5
        return {"correct": (predicted == actual).sum(), "tp": (predicted & actual).sum(),
                "fp": (predicted & ~actual).sum(), "fn": (~predicted & actual).sum()}

    def train_sums(self, output, target):
        return {"correct": self._counts(output, target)["correct"]}

    def train_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"train/acc": float(sums["correct"]) / max(1, n * self.num_outputs)}

    def eval_sums(self, output, target):
        loss = self.loss_fn(self.shape_output(output.float(), target), target.float()).double() * len(target)
        return {"loss": loss, **self._counts(output, target)}

    def eval_metrics(self, sums, n: int) -> Dict[str, float]:
        tp, fp, fn = (float(sums[k]) for k in ("tp", "fp", "fn"))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        return {"val/loss": float(sums["loss"]) / max(1, n),
                "val/acc": float(sums["correct"]) / max(1, n * self.num_outputs),
                "val/precision": precision, "val/recall": recall, "val/f1": f1}

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
