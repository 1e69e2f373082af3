"""A stateful callback: a tally of the training that must come out the same whether or not the run was resumed."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional

from trainrun.callbacks import Callback


class TrainingTally(Callback):
    """Counts optimizer steps and evaluations, sums the train loss of every step and keeps the best `monitor`
    value seen (the larger is better with mode="max").

    Its state changes every step and travels in trainrun's checkpoints (`state_dict` / `load_state_dict`), so a
    stopped and resumed run ends with exactly the tally of an uninterrupted one. At the end of every invocation
    it writes the tally to `<run dir>/<filename>` as JSON.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", filename: str = "training_tally.json"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be max or min")
        self.monitor, self.mode, self.filename = monitor, mode, filename
        self.steps = 0
        self.loss_sum = 0.0
        self.evaluations = 0
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None

    def on_step_end(self, run, step: int, metrics: Dict[str, float]) -> None:
        self.steps += 1
        self.loss_sum += float(metrics["train/loss"])

    def on_eval_end(self, run, step: int, metrics: Dict[str, float]) -> None:
        self.evaluations += 1
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.best_step = value, step

    def on_fit_end(self, run, metrics: Dict[str, float]) -> None:
        path = run.dir / self.filename
        path.write_text(json.dumps(self.state_dict(), indent=2, sort_keys=True) + "\n")

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "loss_sum": self.loss_sum, "evaluations": self.evaluations,
                "monitor": self.monitor, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["monitor"] != self.monitor:
            raise ValueError(f"the checkpoint's tally follows {state['monitor']}, this one {self.monitor}; "
                             f"set monitor={state['monitor']} or start a new run")
        self.steps = int(state["steps"])
        self.loss_sum = float(state["loss_sum"])
        self.evaluations = int(state["evaluations"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
