"""mode=lr_find: the LR range test (exponentially growing LR, smoothed loss, the steepest descent suggested)."""
from __future__ import annotations

import json
from typing import Dict

from trainrun.logging import console


def lr_find_mode(run, t0: float) -> Dict[str, float]:
    from trainrun.diagnostics import lr_find, plot_lr_find
    from trainrun.loop import micro_batches

    lf = run.cfg.lr_find
    result = lr_find(run.net, run.optimizer, micro_batches(run.trainer), run.task.loss, run.precision, run.device,
                     lf.start_lr, lf.end_lr, lf.num_steps, lf.smooth, lf.diverge)
    if run.info.is_main:
        (run.dir / "lr_find.json").write_text(json.dumps(result, indent=2))
        plot_lr_find(result, run.dir / "lr_find.png")
        sugg = result["suggested_lr"]
        console().print(f"LR range test over {len(result['lrs'])} steps ({lf.start_lr:g} -> {lf.end_lr:g}): "
                        f"suggested optimizer.lr={sugg:.3g} (steepest descent), lowest loss at "
                        f"{result['min_loss_lr']:.3g}; plot: {run.dir / 'lr_find.png'}" if sugg else
                        "LR range test: no descent found; try a smaller lr_find.start_lr or more lr_find.num_steps")
    return {"suggested_lr": result["suggested_lr"], "finished": True}
