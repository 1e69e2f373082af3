"""Build the configured task: its loss from the config (or the user's `task._target_`) and its output shape from
the data (classes, labels, or the target's shape per sample)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainrun.errors import ConfigError
from trainrun.tasks import TASKS, Task


def task_classifies(task_cfg) -> bool:
    """Whether the task's targets are class indices (the data must then say how many classes there are)."""
    return task_cfg.name in TASKS and TASKS.get(task_cfg.name).classifies


def _target_shape(split) -> tuple:
    y = split.train.y
    return tuple(y.shape[1:])


def _builtin_loss(cfg, split, task_cls) -> nn.Module:
    t = cfg.task
    if task_cls.classifies:
        from trainrun.regularization import build_loss, class_weights

        loss = build_loss(cfg.regularization, class_weights(cfg.regularization, split.train.y, split.num_classes))
    elif t.name in ("binary", "multilabel"):
        pos_weight = torch.tensor(list(t.pos_weight), dtype=torch.float32) if t.pos_weight is not None else None
        loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    else:
        loss = {"mse": nn.MSELoss(), "huber": nn.HuberLoss(delta=t.huber_delta), "l1": nn.L1Loss()}[t.loss]
    if cfg.doctor.fault == "reduction_sum":
        from trainrun.doctor import SummedLoss

        return SummedLoss(loss)
    return loss


def _user_loss_or_task(cfg, output_shape):
    """`task._target_`: a whole Task (returned as is) or a loss module / function used by task.name's task."""
    from trainrun import usercode
    from trainrun.config import TaskConfig

    made = usercode.call_factory(cfg.task, "task._target_", usercode.schema_defaults(TaskConfig),
                                 {"output_shape": output_shape})
    if isinstance(made, Task):
        return made, None
    if isinstance(made, nn.Module):
        return None, made
    if callable(made):
        return None, _FunctionLoss(made)
    raise ConfigError(f"task._target_={cfg.task._target_} returned a {type(made).__name__}: return a loss (an "
                      "nn.Module or a function (output, target) -> scalar tensor) or a trainrun.tasks.Task")


class _FunctionLoss(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, output, target):
        return self.fn(output, target)


def _vocabulary(cfg, split) -> int:
    vocab = getattr(split, "vocab_size", None)
    if not vocab:
        raise ConfigError(f"task={cfg.task.name} needs token data with a vocabulary (data=text), not data="
                          f"{cfg.data.get('_target_') or cfg.data.name}")
    return int(vocab)


def build_task(cfg, split, device: torch.device) -> Task:
    """The task for this config and data; checks every target of both splits once, before any training."""
    task_cls = TASKS.get(cfg.task.name)
    if task_cls.classifies:
        output_shape = (split.num_classes,)
    elif cfg.task.name == "binary":
        output_shape = (1,)
    elif task_cls.token_weighted:
        output_shape = (split.input_shape[0], _vocabulary(cfg, split))
    else:
        output_shape = _target_shape(split)
    made_task, user_loss = _user_loss_or_task(cfg, output_shape) if cfg.task.get("_target_") else (None, None)
    if made_task is not None:
        task = made_task
    else:
        from trainrun.metrics import check_fits_outputs

        check_fits_outputs(cfg.task.name, list(cfg.task.get("metrics") or ()), math.prod(output_shape))
        loss = user_loss if user_loss is not None else _builtin_loss(cfg, split, task_cls)
        task = task_cls(cfg.task, loss.to(device), output_shape, class_names=getattr(split, "class_names", None))
    for name, ds in (("train", split.train), ("val", split.val)):
        task.check_targets(ds.y, f"data {name} split")
    return task
