"""mode=train: fit with evaluation, checkpoints, early stopping, signals and the user's callbacks."""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Dict

from trainrun import checkpoint, distributed
from trainrun.build import Run
from trainrun.loop import evaluate_all, fit
from trainrun.modes.session import open_session


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout signal) / SIGUSR2 (submitit's preemption and timeout signal) / first
    Ctrl-C ask the loop to checkpoint at the next step boundary and exit. `handoff`: the Python handler the signal
    had before (submitit's checkpoint-and-requeue), for the caller to run once the checkpoint is complete."""

    def __init__(self):
        self.requested, self.signum, self._old = False, None, {}

    @property
    def handoff(self):
        old = self._old.get(self.signum)
        return old if callable(old) and old is not signal.default_int_handler else None

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _on_eval(run: Run, logger):
    """After every evaluation: the doctor's chance check, the plateau schedule, the best metric, early stopping
    (which restores the best weights it measured), then the callbacks."""
    trainer, cfg, early, ema = run.trainer, run.cfg, run.early, run.ema
    monitor, mode = cfg.checkpoint.monitor, cfg.checkpoint.monitor_mode

    def on_eval(metrics: Dict[str, float]) -> None:
        state = trainer.state
        state.last_eval_step = state.step
        if run.doctor is not None:
            run.doctor.on_eval(state.step, metrics.get("val/acc"))
        value = metrics.get(monitor)
        run.schedule.on_eval(value)
        if value is not None and checkpoint.is_better(value, state.best_metric, mode):
            state.best_metric = value
        # keep the weights that were measured: val/* comes from the EMA copy when EMA is on
        if early is not None and early.step(value, state.step, ema.module if ema is not None else run.model):
            state.stopped_early = True
            logger.print(f"early stopping at step {state.step}: no {monitor} improvement over {early.min_delta} for "
                         f"{early.patience} evaluations (best {early.best} at step {early.best_step})")
            if early.best_weights is not None:
                run.model.load_state_dict(early.best_weights)
                if ema is not None:  # both copies now hold the EMA weights that were measured best
                    ema.module.load_state_dict(early.best_weights)
                state.last_eval = evaluate_all(trainer)
                logger.print(f"restored the best weights (step {early.best_step})")
        run.callbacks.call("on_eval_end", run, state.step, dict(metrics))

    return on_eval


def _on_step(run: Run):
    """The step's loss and LR for the callbacks' on_step_end (a host sync per step: only with callbacks)."""
    if not run.callbacks.wants_step_metrics:
        return None

    def on_step(step: int, out: Dict) -> None:
        metrics = {"train/loss": float(out["loss"]), "lr": run.optimizer.param_groups[0]["lr"]}
        run.callbacks.call("on_step_end", run, step, metrics)

    return on_step


def train_mode(run: Run, t0: float) -> Dict[str, float]:
    logger, saver = open_session(run)
    if run.doctor is not None:
        run.doctor.save_badstep, run.doctor.say = saver.save_badstep, logger.print
        run.doctor.log = logger.log_stats if run.info.is_main else None
    cfg, trainer, total = run.cfg, run.trainer, run.total
    stop_at = min(total, cfg.trainer.stop_at_step or total)
    exit_code = 1
    try:
        already_done = trainer.state.step >= total or trainer.state.stopped_early
        if already_done:
            logger.print(f"run already complete at step {trainer.state.step}/{total}; nothing to do")
        run.callbacks.call("on_fit_start", run)
        profiler = _profiler(run)
        with StopFlag() as stop, profiler or contextlib.nullcontext():
            already_done or fit(trainer, log_every=cfg.logger.log_every,
                                eval_every=cfg.trainer.eval_every or run.steps_per_epoch,
                                ckpt_every=cfg.trainer.ckpt_every or run.steps_per_epoch, stop_at=stop_at,
                                log=logger.log, on_eval=_on_eval(run, logger), save=saver.save,
                                advance=logger.advance, eval_at_start=cfg.trainer.eval_at_start,
                                on_step=profiler.wrap(_on_step(run)) if profiler else _on_step(run),
                                should_stop=lambda: distributed.any_rank(
                                    stop.requested or trainer.state.stopped_early, run.device))
        saver.close()  # an asynchronous write in flight completes before the run reports its end
        if profiler is not None and profiler.written:
            logger.print("profile: " + ", ".join(f"{k} {v}" for k, v in profiler.written.items())
                         + " (open the trace in TensorBoard's profiler or ui.perfetto.dev)")
        final = _final_metrics(run, t0)
        done = trainer.state.step >= total or trainer.state.stopped_early
        run.callbacks.call("on_fit_end", run, dict(final))
        logger.summary("trainrun: finished" if done else f"trainrun: stopped at step {trainer.state.step}/{total} "
                       f"(checkpointed; resume={run.dir} continues)", final)
        if run.finetuner is not None and cfg.finetune.lora_rank > 0 and run.info.is_main:
            logger.print(f"LoRA merged into the base weights: {export_merged(run)} (a plain model's weights: "
                         "load them with model.weights=PATH)")
        if cfg.logger.plots and run.info.is_main:
            from trainrun.plots import plot_evaluation, plot_finished

            if plot_finished(run.dir):  # [] after a failed write (one warning said so): the disk is full
                plot_evaluation(run.dir, trainer.task.last_evaluation, title=run.dir.name)
            _write_report(run, logger)
        exit_code = 0
        return {**final, "finished": done, "signal": None if done else stop.signum,
                "handoff": None if done else stop.handoff}
    finally:
        try:
            saver.close(quiet=exit_code != 0)  # an error or a second Ctrl-C: the write in flight still completes
        finally:
            logger.close(exit_code)


def export_merged(run: Run):
    """The LoRA run's weights with every adapter merged into its base layer, under the original model's names:
    RUN/merged.safetensors (the adapters themselves stay in the checkpoints, which resume exactly)."""
    import copy

    from safetensors.torch import save_model

    from trainrun.finetune import merge_lora

    merged = merge_lora(copy.deepcopy(run.model).cpu())
    path = run.dir / "merged.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    save_model(merged, str(tmp), force_contiguous=True)  # a tied weight (GPT head = embedding) stored once
    tmp.replace(path)
    return path


def _write_report(run: Run, logger) -> None:
    """RUN/report.md and report.html (trainrun.report); a by-product: a failed write is one warning line."""
    from trainrun.report import write_report

    try:
        paths = write_report(run.dir)
        logger.print(f"report: {paths[-1]} (trainrun-report {run.dir} rewrites it, e.g. after mode=test)")
    except OSError as e:
        logger.print(f"[yellow]warning:[/] could not write the report of {run.dir} ({e.strerror or e}); "
                     f"the results and checkpoints are complete; write it later with trainrun-report {run.dir}")


def _profiler(run: Run):
    """trainer.profile: the torch.profiler window (rank 0 only under torchrun)."""
    if not run.cfg.trainer.profile or not run.info.is_main:
        return None
    from trainrun.profiling import StepProfiler

    return StepProfiler(run.dir, run.cfg.trainer.profile_start, run.cfg.trainer.profile_steps, run.device)


def _final_metrics(run: Run, t0: float) -> Dict[str, float]:
    state, monitor = run.state, run.cfg.checkpoint.monitor
    final = {"step": state.step, **state.last_eval}
    if state.best_metric is not None:
        final[f"best {monitor}"] = state.best_metric
    final["wall_time_s"] = round(time.perf_counter() - t0, 2)
    return final
