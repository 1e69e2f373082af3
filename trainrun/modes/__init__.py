"""One function per mode, each taking the built `Run`: train, eval, lr_find, overfit_batch, init_report; and the
modes over a checkpoint's files alone (consolidate), which build nothing and take (cfg, run_dir)."""
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


def _lazy(module: str, function: str) -> Callable:
    """A mode whose module is imported only when it runs (export pulls in onnx, predict writes files)."""
    def mode(*args) -> Dict[str, float]:
        import importlib

        return getattr(importlib.import_module(f"trainrun.modes.{module}"), function)(*args)
    return mode


MODES.register("test", _lazy("test", "test_mode"))
MODES.register("predict", _lazy("predict", "predict_mode"))
MODES.register("export", _lazy("export", "export_mode"))
MODES.register("consolidate", _lazy("consolidate", "consolidate_mode"))
MODES.register("generate", _lazy("generate", "generate_mode"))
CHECKPOINT_ONLY = ("consolidate", "generate")  # called as MODES[mode](cfg, run_dir, t0): nothing is built

RESTORES = {"train": True, "eval": False, "init_report": False, "lr_find": False, "overfit_batch": False,
            "test": False, "predict": False, "export": False, "consolidate": False,
            "generate": False}
"""Whether the mode continues a checkpoint's training state (eval reads only the weights, itself)."""

__all__ = ["CHECKPOINT_ONLY", "MODES", "RESTORES"]
