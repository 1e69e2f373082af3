"""Regression: real-valued targets of any shape, MSE / Huber / L1 loss. Metrics (trainrun.metrics, torchmetrics, in
float64): loss, MAE, RMSE and R^2 (the uniform average over output values of 1 - SS_res / SS_tot, as
scikit-learn's r2_score)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from trainrun.errors import DataError
from trainrun.tasks import TASKS, MeasuredTask


@TASKS.register("regression", doc="real-valued targets of any shape: MSE / Huber / L1 loss, MAE, RMSE and R^2")
class Regression(MeasuredTask):
    name = "regression"

    @staticmethod
    def metric_names(task_cfg) -> Tuple[str, ...]:
        from trainrun.metrics import logged_names

        return logged_names("regression", ())

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

    def evaluation(self):
        from trainrun.metrics import RegressionMetrics

        return RegressionMetrics(self.extra_metrics(), self._summed_loss, self.num_outputs)

    def _summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.shape_output(output.float(), target), target.float()).double() * len(target)

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if not y.is_floating_point():
            raise DataError(f"{what}: task=regression needs real-valued (float) targets, got {y.dtype}; convert them "
                            "with y.float(), or use task=classification for class indices")
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{what}: the targets hold NaN or inf; drop or impute those samples")
