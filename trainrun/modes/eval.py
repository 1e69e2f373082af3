"""mode=eval: the checkpoint's weights (its EMA weights too, when it has them) on the validation split."""
from __future__ import annotations

import json
from typing import Dict

from trainrun.logging import console, print_metrics
from trainrun.loop import evaluate_all
from trainrun.regularization import EMA


def eval_mode(run, t0: float) -> Dict[str, float]:
    resumed, trainer = run.resumed, run.trainer
    run.model.load_state_dict(resumed.state["model"])
    if "ema" in resumed.state:
        trainer.ema = trainer.ema or EMA(run.model, 0.0)
        trainer.ema.load_state_dict(resumed.state["ema"])
    metrics = evaluate_all(trainer)
    if run.cfg.logger.plots and run.info.is_main:
        from trainrun.plots import plot_evaluation

        plot_evaluation(run.dir, trainer.task.last_evaluation, title=f"eval of {resumed.dir.name}")
    (run.dir / "eval.json").write_text(json.dumps({"checkpoint": str(resumed.dir), "sha256": resumed.meta["sha256"],
                                                   "step": resumed.meta["step"], **metrics}, indent=2))
    print_metrics(console(), f"eval of {resumed.dir}", {"step": resumed.meta["step"], **metrics})
    return {**metrics, "finished": True}
