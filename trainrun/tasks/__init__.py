"""Tasks: the contract between a batch's targets, the model's output, the loss and the metrics.

The loop never reads targets itself (no `argmax` in the loop): it asks the task for the loss of a micro-batch and
for *sums* (correct predictions, ...) that add up over micro-batches, steps and ranks, so the train metrics reduce
exactly across processes (an all-reduce of the sums) and equal what one process would compute. Evaluation asks the
task for an `evaluation()` accumulator: the built-in tasks measure with torchmetrics (trainrun.metrics, `task.metrics`
adds more); a user Task's default accumulator adds up its `eval_sums` and calls `eval_metrics`.
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
    token_weighted = False  # the loop averages the loss over the step's counted tokens (causal_lm), not samples

    def __init__(self, cfg, loss_fn: nn.Module, output_shape: Tuple[int, ...],
                 class_names: Optional[Sequence[str]] = None):
        self.cfg, self.loss_fn, self.output_shape = cfg, loss_fn, tuple(output_shape)
        self.class_names = class_names  # the data's, for per-class metrics and the confusion matrix's axes
        self.last_evaluation = None  # the accumulator of the latest val/* evaluation (the end-of-run plots read it)

    @property
    def num_outputs(self) -> int:
        n = 1
        for d in self.output_shape:
            n *= d
        return n

    @staticmethod
    def metric_names(task_cfg) -> Tuple[str, ...]:
        """What evaluation logs (without the val/ prefix) for this task section: checkpoint.monitor may name any."""
        return ("loss",)

    def evaluation(self):
        """A fresh accumulator of one evaluation pass: update(output, target) per batch, compute() once."""
        return SumsEvaluation(self)

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

    def window_metrics(self, mean_loss: float, samples_per_s: float) -> Dict[str, float]:
        """Train metrics a log window derives from its mean loss and throughput (causal_lm: perplexity, tokens/s)."""
        return {}

    def extra_metrics(self) -> Tuple[str, ...]:
        return tuple((self.cfg.get("metrics") or ()) if self.cfg is not None else ())

    def initial_loss(self) -> Optional[float]:
        """The mean loss a model with uniform (zero) outputs has at step 0, if the task knows it."""
        return None

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        """Refuse, in one line, targets this task cannot train on (called once on each split's targets)."""


class SumsEvaluation:
    """The evaluation of a task defined by sums (a user Task): `eval_sums` added batch by batch, `eval_metrics`."""

    def __init__(self, task: Task):
        self.task, self.sums, self.n = task, {}, 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        for k, v in self.task.eval_sums(output, target).items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += len(target)

    def compute(self) -> Dict[str, float]:
        if not self.sums:  # an empty stream
            return {f"val/{name}": float("nan") for name in self.task.metric_names(self.task.cfg)}
        return self.task.eval_metrics(self.sums, self.n)

    def confusion_matrix(self):
        return None

    def reliability(self):
        return None


class MeasuredTask(Task):
    """A built-in task measured by a trainrun.metrics Evaluation; its eval_sums are that evaluation's states (which
    add up over batches as sums do) and eval_metrics computes from them."""

    @staticmethod
    def metric_names(task_cfg) -> Tuple[str, ...]:
        raise NotImplementedError

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        evaluation = self.evaluation()
        evaluation.update(output, target)
        return evaluation.state()

    def eval_metrics(self, sums, n: int) -> Dict[str, float]:
        evaluation = self.evaluation()
        evaluation.merge(sums)
        return evaluation.compute()


def model_classes(task: Task, split) -> int:
    """The `num_classes` a model factory gets: a language model's vocabulary, the data's classes, else the task's
    outputs per sample."""
    return getattr(task, "vocab_size", None) or (split.num_classes if split.num_classes is not None
                                                 else task.num_outputs)


def check(cfg) -> None:
    """Range checks of the task section, and the extra metrics it asks for."""
    from trainrun import metrics

    checks = SectionChecks(cfg, "task")
    if cfg.get("_target_") is None:
        checks.one_of("name", TASKS.names())
    problem = metrics.extras_problem(cfg.name, list(cfg.get("metrics") or ()))
    if problem:
        checks.fail("metrics", problem)
    checks.one_of("loss", ("mse", "huber", "l1"))
    checks.positive("huber_delta")
    checks.unit("threshold")
    if cfg.pos_weight is not None and any(w <= 0 for w in cfg.pos_weight):
        checks.fail("pos_weight", "every positive-class weight must be > 0 (e.g. n_negative / n_positive)")


def metric_names(cfg) -> Tuple[str, ...]:
    """val/* names evaluation will log for this config's task, `task.metrics` included (checkpoint.monitor, early
    stopping, the plateau schedule and a sweep's objective may name any of them). Per-class accuracies
    (val/acc/<class>) depend on the data's classes and are not listed."""
    task_cfg = cfg.task
    if task_cfg.get("_target_") is None or task_cfg.name in TASKS:
        cls = TASKS.get(task_cfg.name)
    else:
        cls = Task
    return tuple(f"val/{m}" for m in cls.metric_names(task_cfg))


from trainrun.tasks import classification, sigmoid, regression, causal_lm  # noqa: E402,F401  (the built-ins)
