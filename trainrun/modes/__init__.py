"""One function per mode, each taking the built `Run`: train, eval, lr_find, overfit_batch, init_report."""
from __future__ import annotations

from typing import Callable, Dict

from trainrun.modes.eval import eval_mode
from trainrun.modes.init_report import init_report_mode
from trainrun.modes.lr_find import lr_find_mode
from trainrun.modes.overfit_batch import overfit_batch_mode
from trainrun.modes.train import train_mode
from trainrun.registry import Registry

MODES = Registry("mode")  # name -> function(run, t0) -> final metrics
MODES.register("train", train_mode)
MODES.register("eval", eval_mode)
MODES.register("init_report", init_report_mode)
MODES.register("lr_find", lr_find_mode)
MODES.register("overfit_batch", overfit_batch_mode)

RESTORES = {"train": True, "eval": False, "init_report": False, "lr_find": False, "overfit_batch": False}
"""Whether the mode continues a checkpoint's training state (eval reads only the weights, itself)."""

__all__ = ["MODES", "RESTORES"]
