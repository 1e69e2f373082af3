"""Regression: real-valued targets of any shape, MSE / Huber / L1 loss. Metrics: loss, MAE, RMSE and R^2 (the
uniform average over output values of 1 - SS_res / SS_tot, as scikit-learn's r2_score), computed from sums that
add up across batches and ranks."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from trainrun.errors import DataError
from trainrun.tasks import TASKS, Task


@TASKS.register("regression", doc="real-valued targets of any shape: MSE / Huber / L1 loss, MAE, RMSE and R^2")
class Regression(Task):
    name = "regression"

    @staticmethod
    def metric_names(cfg) -> Tuple[str, ...]:
        return ("loss", "mae", "rmse", "r2")

    def accepted_output_shapes(self) -> Sequence[Tuple[int, ...]]:
        return (self.output_shape, (1,)) if self.output_shape == () else (self.output_shape,)

    def shape_output(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.reshape(target.shape)

    def loss(self, output, target):
        return self.loss_fn(self.shape_output(output.float(), target), target.float())

    def _errors(self, output, target) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction - target, target) flattened to [N, outputs], float64."""
        pred = self.shape_output(output.detach(), target).double().reshape(len(target), -1)
        truth = target.double().reshape(len(target), -1)
        return pred - truth, truth

    def train_sums(self, output, target):
        err, _ = self._errors(output, target)
        return {"abs_err": err.abs().sum()}

    def train_metrics(self, sums, n: int) -> Dict[str, float]:
        return {"train/mae": float(sums["abs_err"]) / max(1, n * self.num_outputs)}

    def eval_sums(self, output, target):
        err, truth = self._errors(output, target)
        loss = self.loss_fn(self.shape_output(output.float(), target), target.float()).double() * len(target)
        return {"loss": loss, "abs_err": err.abs().sum(), "sq_err": (err ** 2).sum(0), "y": truth.sum(0),
                "y2": (truth ** 2).sum(0)}

    def eval_metrics(self, sums, n: int) -> Dict[str, float]:
        n = max(1, n)
        ss_tot = sums["y2"] - sums["y"] ** 2 / n
        ss_res = sums["sq_err"]
        # sklearn: an output with constant targets scores 1 if predicted exactly, else 0
        r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).double())
        return {"val/loss": float(sums["loss"]) / n, "val/mae": float(sums["abs_err"]) / (n * self.num_outputs),
                "val/rmse": float((ss_res.sum() / (n * self.num_outputs)).sqrt()), "val/r2": float(r2.mean())}

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if not y.is_floating_point():
            raise DataError(f"{what}: task=regression needs real-valued (float) targets, got {y.dtype}; convert them "
                            "with y.float(), or use task=classification for class indices")
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{what}: the targets hold NaN or inf; drop or impute those samples")
