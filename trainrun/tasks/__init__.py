"""Tasks: the contract between a batch's targets, the model's output, the loss and the metrics.

The loop never reads targets itself (no `argmax` in the loop): it asks the task for the loss of a micro-batch and
for *sums* (correct predictions, squared errors, ...) that add up over micro-batches, steps and ranks, so every
metric reduces exactly across processes (an all-reduce of the sums) and equals what one process would compute.
Tasks register by name (`task=NAME`); `task._target_` names a user loss or a whole user Task.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError
from trainrun.registry import Registry

TASKS = Registry("task.name")  # name -> Task subclass


class Task:
    """The base contract. `loss_fn` is an nn.Module (output, target) -> scalar; the doctor and the distiller use
    it too. `num_outputs` is the per-sample output size the model must produce."""
    name = "task"
    mixes_targets = False  # whether MixUp/CutMix may mix this task's targets
    classifies = False  # classes with labels 0..C-1: the doctor's ln(C) and chance checks apply

    def __init__(self, cfg, loss_fn: nn.Module, output_shape: Tuple[int, ...]):
        self.cfg, self.loss_fn, self.output_shape = cfg, loss_fn, tuple(output_shape)

    @property
    def num_outputs(self) -> int:
        n = 1
        for d in self.output_shape:
            n *= d
        return n

    @staticmethod
    def metric_names(cfg) -> Tuple[str, ...]:
        """What evaluation logs (without the val/ prefix): checkpoint.monitor may name any of them."""
        return ("loss",)

    def check_output(self, output: torch.Tensor, key: str) -> None:
        """One line if a model's output for one sample cannot be compared with this task's targets."""
        got = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else type(output).__name__
        if not isinstance(output, torch.Tensor) or got not in self.accepted_output_shapes():
            want = " or ".join(str(list(s)) for s in self.accepted_output_shapes())
            raise ConfigError(f"{key}: the model returns {got} per sample, but task={self.name} needs {want} "
                              f"({self.output_meaning()}); change the model's last layer or the task")

    def accepted_output_shapes(self) -> Sequence[Tuple[int, ...]]:
        return (self.output_shape,)

    def output_meaning(self) -> str:
        return "one output per target value"

    def shape_output(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The output as the loss and the metrics compare it with `target` (e.g. [N, 1] -> [N])."""
        return output

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.shape_output(output.float(), target), target)

    def train_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Sums over one micro-batch (detached) from which `train_metrics` computes the train/* metrics."""
        return {}

    def train_metrics(self, sums: Dict[str, float], n: int) -> Dict[str, float]:
        return {}

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Sums over one validation batch (float64 or integer tensors): the loss summed over samples, etc."""
        return {"loss": self.loss_fn(self.shape_output(output.float(), target), target).double() * len(target)}

    def eval_metrics(self, sums: Dict[str, torch.Tensor], n: int) -> Dict[str, float]:
        return {"val/loss": float(sums["loss"]) / max(1, n)}

    def initial_loss(self) -> Optional[float]:
        """The mean loss a model with uniform (zero) outputs has at step 0, if the task knows it."""
        return None

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        """Refuse, in one line, targets this task cannot train on (called once on each split's targets)."""


def check(cfg) -> None:
    """Range checks of the task section."""
    checks = SectionChecks(cfg, "task")
    if cfg.get("_target_") is None:
        checks.one_of("name", TASKS.names())
    checks.one_of("loss", ("mse", "huber", "l1"))
    checks.positive("huber_delta")
    checks.unit("threshold")
    if cfg.pos_weight is not None and any(w <= 0 for w in cfg.pos_weight):
        checks.fail("pos_weight", "every positive-class weight must be > 0 (e.g. n_negative / n_positive)")


def metric_names(cfg) -> Tuple[str, ...]:
    """val/* names evaluation will log for this config's task (user tasks: their class's metric_names)."""
    task_cfg = cfg.task
    if task_cfg.get("_target_") is None or task_cfg.name in TASKS:
        cls = TASKS.get(task_cfg.name)
    else:
        cls = Task
    return tuple(f"val/{m}" for m in cls.metric_names(cfg))


from trainrun.tasks import classification, sigmoid, regression  # noqa: E402,F401  (registers the built-ins)
