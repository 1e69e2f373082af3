"""mode=overfit_batch: can this model, loss and optimizer drive one fixed batch's loss to ~0?"""
from __future__ import annotations

import json
from typing import Dict

from trainrun import distributed
from trainrun.build import Run
from trainrun.doctor import TrainingHalted, overfit_verdict
from trainrun.loop import overfit_one_batch
from trainrun.modes.session import open_session


def overfit_batch_mode(run: Run, t0: float) -> Dict:
    logger, saver = open_session(run)
    doctor, cfg = run.doctor, run.cfg
    doctor.save_badstep, doctor.say = saver.save_badstep, logger.print
    doctor.log = logger.log_stats if run.info.is_main else None
    if run.overfit_changes:
        logger.print("overfit_batch turned off: " + "; ".join(run.overfit_changes))
    d = cfg.doctor
    try:
        logger.print(f"overfit_batch: one batch of {cfg.data.batch_size} training samples, up to {d.overfit_steps} "
                     f"steps, passes below loss {d.overfit_loss:g}")
        losses, norms, halted = overfit_one_batch(run.trainer, d.overfit_steps, d.overfit_loss)
        doctor.check_label_probe()
        verdict = overfit_verdict(losses, norms, d.overfit_loss, doctor.findings,
                                  run.optimizer.param_groups[0]["lr"], halted)
        verdict["findings"] = dict(doctor.findings)
        if distributed.env_info().is_main:
            (run.dir / "overfit_batch.json").write_text(json.dumps({**verdict, "losses": losses,
                                                                    "grad_norms": norms}, indent=2))
        if verdict["passed"]:
            logger.print(f"[bold green]overfit_batch PASSED[/] in {verdict['steps']} steps: loss "
                         f"{verdict['first_loss']:.4g} -> {verdict['final_loss']:.4g}")
            for cause in verdict["new_causes"]:  # findings worth knowing even when the batch was memorised
                logger.print(f"  note: {cause}")
            return {"passed": True, "steps": verdict["steps"], "final_loss": verdict["final_loss"], "finished": True}
        logger.print(f"[bold red]overfit_batch FAILED[/] after {verdict['steps']} steps: loss "
                     f"{verdict['first_loss']:.4g} -> {verdict['final_loss']:.4g} (target < {d.overfit_loss:g})")
        for cause in verdict["new_causes"] or (["the doctor's finding above"] if verdict["causes"] else []):
            logger.print(f"  likely cause: {cause}")
        raise TrainingHalted(f"overfit_batch failed: {verdict['causes'][0] if verdict['causes'] else 'see above'}")
    finally:
        logger.close(0)
