"""User callbacks: one with state that must resume exactly, one that fails."""
import json

from trainrun.callbacks import Callback


class LossTally(Callback):
    """Counts steps and sums the train loss of each; writes its state at fit end."""

    def __init__(self, out: str = "tally.json"):
        self.out, self.steps, self.loss_sum, self.evals = out, 0, 0.0, []

    def on_step_end(self, run, step, metrics):
        self.steps += 1
        self.loss_sum += metrics["train/loss"]

    def on_eval_end(self, run, step, metrics):
        self.evals.append([step, metrics.get("val/loss")])

    def on_fit_end(self, run, metrics):
        (run.dir / self.out).write_text(json.dumps(self.state_dict()))

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum, "evals": [list(e) for e in self.evals]}

    def load_state_dict(self, state):
        self.steps, self.loss_sum, self.evals = state["steps"], state["loss_sum"], [list(e) for e in state["evals"]]


class Explodes(Callback):
    def __init__(self, at_step: int = 3):
        self.at_step = at_step

    def on_step_end(self, run, step, metrics):
        if step == self.at_step:
            raise RuntimeError(f"boom at step {step}")
