"""mode=init_report: per-layer activation statistics of the freshly initialised model on one training batch."""
from __future__ import annotations

import json
from typing import Dict

from trainrun.logging import console


def init_report_mode(run, t0: float) -> Dict[str, float]:
    from trainrun.diagnostics import activation_report, render_activation_report

    cfg = run.cfg
    x = next(run.trainer.train.iter_epoch(0))[0].to(run.device)
    rows = activation_report(run.model, x)
    (run.dir / "init_report.json").write_text(json.dumps(rows, indent=2))
    what = f"model._target_={cfg.model._target_}" if cfg.model.get("_target_") else f"model={cfg.model.name}"
    render_activation_report(rows, console(), title=f"activations at init: {what} init={cfg.init.name}")
    return {"layers": len(rows), "last_var": rows[-1]["var"] if rows else float("nan")}
