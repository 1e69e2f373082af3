"""What the modes that train share: accepting the run directory, the logger and its header, and checkpointing.

Only here is the run directory touched: every check has passed by the time `open_session` runs.
"""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import string
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from trainrun import checkpoint, distributed, provenance, rundir, trackers
from trainrun.build import Run, state_dict
from trainrun.diagnostics import memory_plan
from trainrun.logging import RunLogger, config_tree, write_failure


def open_session(run: Run) -> Tuple[RunLogger, "Checkpointer"]:
    """Accept the run directory (a fresh run clears what an earlier attempt left before its first checkpoint;
    config.yaml always holds this process's config; trainrun.log opens), then the logger and the run header."""
    cfg, info, resumed = run.cfg, run.info, run.resumed
    run.schedule.apply(run.optimizer, run.state.step)
    wandb_id = resumed.meta.get("wandb_id") if resumed else None
    if "wandb" in trackers.active(cfg.logger) and wandb_id is None:
        wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        cleared = rundir.accept(run.dir, OmegaConf.to_yaml(cfg, resolve=True), fresh=not resumed,
                                main_process=info.is_main)
    except OSError as e:  # a full disk before the first step: one line, and no resume= to suggest
        (run.dir / f".{rundir.CONFIG_FILE}.tmp").unlink(missing_ok=True)  # what write_config had begun
        raise write_failure(Path(e.filename or run.dir / rundir.CONFIG_FILE), e, run.dir) from e
    ids = {"mlflow_run_id": resumed.meta.get("mlflow_run_id")} if resumed else {}
    logger = RunLogger(cfg.logger, run.dir, run.total, run.state.step, run.resolved, wandb_id,
                       main_process=info.is_main, tracker_ids=ids)
    _print_header(run, logger, cleared)
    saver = Checkpointer(run, wandb_id)
    kept = {k: v for k, v in ids.items() if v}  # a resume without the tracker keeps the link for a later one
    saver.tracker_ids, saver.on_saved = {**kept, **logger.tracker_ids()}, logger.checkpoint_saved
    return logger, saver


def _print_header(run: Run, logger: RunLogger, cleared) -> None:
    cfg, info, resumed = run.cfg, run.info, run.resumed
    logger.print(f"[bold]trainrun[/] run dir: {run.dir}")
    if cleared:
        logger.print(f"{run.dir} held an earlier attempt that stopped before its first checkpoint: started over "
                     f"(removed {', '.join(cleared)})")
    if not resumed:
        from trainrun.config import TrainrunConfig

        logger.print(config_tree(cfg, OmegaConf.structured(TrainrunConfig)))
    logger.print(f"data: {run.split.description}")
    logger.print(_memory_line(run))
    logger.print(_space_line(run))
    for line in _finetune_lines(run):
        logger.print(line)
    n_params = sum(p.numel() for p in run.model.parameters())
    model = f"{cfg.model._target_}" if cfg.model.get("_target_") else cfg.model.name
    task = "" if cfg.task.name == "classification" and not cfg.task.get("_target_") else f"task: {cfg.task.name} | "
    acc, parallel = cfg.trainer.accumulation_steps, run.parallel
    logger.print(f"model: {model} ({n_params:,} params) | {task}optimizer: {cfg.optimizer.name} "
                 f"lr {run.optimizer.param_groups[0]['base_lr']:.4g} | schedule: {cfg.schedule.name} | precision: "
                 f"{cfg.precision.name} | device: {run.device}, {torch.get_num_threads()} CPU threads "
                 f"| global batch {run.global_batch}"
                 + (f" ({cfg.data.batch_size} per rank x {info.world} ranks x {acc} accumulation, {parallel})"
                    if info.enabled else "") + f" | {run.total} steps")
    if resumed:
        s = run.state
        logger.print(f"resumed from {resumed.dir} at step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch})")


def _memory_line(run: Run) -> str:
    cfg, info = run.cfg, run.info
    plan = memory_plan(run.model, cfg.optimizer.name, cfg.optimizer.momentum, cfg.precision.name,
                       shards=info.world if run.parallel == "fsdp2" else 1)
    mb = 1024 ** 2
    sharded = f" per rank (FSDP2 shards weights, grads and optimizer state over {info.world} ranks)" \
        if plan["shards"] > 1 else ""
    total = sum(p.numel() for p in run.model.parameters())
    trainable = (f" ({plan['params']:,} of {total:,} params train: frozen ones have no gradients or optimizer "
                 "state)") if plan["params"] < total else ""
    return (f"memory plan{sharded}{trainable}: {plan['params']:,} params x {plan['bytes_per_param']:.1f} B/param = "
            f"{plan['total'] / mb:.2f} MiB (weights {plan['weights'] / mb:.2f}, grads {plan['grads'] / mb:.2f}, "
            f"optimizer state {plan['optimizer_state'] / mb:.2f}; master copy: {plan['master_copy']}) "
            f"+ activations{_activation_estimate(run)}; measured peak logged as peak_mem_mb")


def _activation_estimate(run: Run) -> str:
    """' ~X MiB at batch B' from one training-mode forward of one zero sample (trainrun.models.checkpointing), in
    the run's autocast; every RNG and buffer as before. Not under torchrun (a lone forward of a sharded or
    SyncBatchNorm model would wait for the other ranks) nor for a model the zero sample does not fit."""
    from trainrun.models.checkpointing import activation_bytes_estimate

    cfg = run.cfg
    if run.info.enabled:
        return ""
    devices = [run.device] if run.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), run.precision.autocast():
            est = activation_bytes_estimate(run.model, run.split.input_shape, cfg.data.batch_size,
                                            cfg.trainer.activation_checkpointing)
    except Exception:  # noqa: BLE001  (a user model may take other inputs: the line just has no estimate)
        return ""
    how = ", checkpointed per block" if cfg.trainer.activation_checkpointing else ""
    return f" ~{est / 1024 ** 2:,.1f} MiB at batch {cfg.data.batch_size}{how} (measured on one sample)"


def _space_line(run: Run) -> str:
    """What the run's checkpoints will take on disk (checkpoint.space_plan) from the state's measured byte size:
    the resumed checkpoint's, else the state now, plus the optimizer moments that its first step creates. Under
    FSDP2 (no full gather for a line of output): the weights' and optimizer state's sizes from the model."""
    cfg, ck = run.cfg, run.cfg.checkpoint
    stored = run.resumed.meta.get("state_bytes") if run.resumed else None
    plan = memory_plan(run.model, cfg.optimizer.name, cfg.optimizer.momentum, cfg.precision.name, shards=1)
    if run.parallel == "fsdp2":  # no full gather for an estimate: the weights' and optimizer state's sizes
        nbytes = int(plan["weights"] + plan["optimizer_state"])
    elif isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
        nbytes = stored
    else:
        nbytes = checkpoint._state_nbytes(state_dict(run))
        if not any(run.optimizer.state.values()):
            nbytes += int(plan["optimizer_state"])
    steps = checkpoint.save_steps(run.total, cfg.trainer.ckpt_every or run.steps_per_epoch)  # a resumed run's
    # earlier checkpoints and milestones are on disk too
    line, too_big = checkpoint.space_plan(run.dir, nbytes, steps, keep_last=ck.keep_last, keep_best=ck.keep_best,
                                          keep_every_n_steps=ck.keep_every_n_steps)
    if too_big:
        line += ("; [yellow]warning:[/] more than the free space: lower checkpoint.keep_last or "
                 "checkpoint.keep_every_n_steps, or set output_root to a larger disk")
    return line


def _finetune_lines(run: Run):
    """Where the starting weights came from, and what trains."""
    if run.weights and not run.resumed:
        w = run.weights
        counts = ", ".join(f"{len(w.get(k) or [])} {k}" for k in ("missing", "unexpected", "mismatched"))
        head = f"; head replaced ({len(w.get('head') or [])} tensors, expected)" if w.get("head") else ""
        yield f"weights: {w.get('source')} (sha256 {str(w.get('sha256'))[:12]}...): {counts}{head}"
    ft = run.finetuner
    if ft is not None:
        s = ft.summary()
        lora = f", LoRA adapters {s['lora']:,}" if s.get("lora") else ""
        stages = f" | {len(ft.stages)} unfreeze stage(s) at steps {[st[0] for st in ft.stages]}" if ft.stages else ""
        yield (f"finetune: {run.cfg.finetune.name}: {s['trainable']:,} of {s['total']:,} params train "
               f"(frozen {s['frozen']:,}{lora}){stages}")
    if run.lr_scales:
        scales = sorted(set(round(v, 4) for v in run.lr_scales.values()))
        yield f"finetune: LR factors per layer from {scales[0]:g} to {scales[-1]:g} ({len(run.lr_scales)} layers)"


class Checkpointer:
    """Writes the run's checkpoints: every registered part's state, and meta.json's provenance."""

    def __init__(self, run: Run, wandb_id: Optional[str]):
        self.run, self.wandb_id = run, wandb_id
        self.tracker_ids: Dict[str, str] = {}  # MLflow's run id: a resume continues the same tracker run
        self.on_saved: Optional[Callable[[int, str], None]] = None  # trackers tag each checkpoint's SHA256
        resumed = run.resumed
        self.last_sha = resumed.meta["sha256"] if resumed else None
        self.last_step = run.state.step if resumed else None
        self.wall_before = resumed.meta.get("wall_time_s", 0.0) if resumed else 0.0
        self.started = time.perf_counter()
        self.env = provenance.environment()
        self.user_code = _user_code_provenance(run.resolved)
        self.writer = checkpoint.AsyncWriter() if run.cfg.checkpoint.async_save else None
        self.stall_s: List[float] = []  # seconds each save kept training waiting (scripts/bench_checkpoint.py)

    def meta(self) -> Dict[str, Any]:
        run = self.run
        cfg, s, resumed = run.cfg, run.state, run.resumed
        data = {"name": cfg.data._target_ if cfg.data.get("_target_") else cfg.data.name,
                "fingerprint": run.split.fingerprint, "description": run.split.description,
                **({"fingerprint_changed_from": run.data_changed_from} if run.data_changed_from else {})}
        return {
            "run_dir": str(run.dir.resolve()),
            "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "total_steps": run.total, "seed": cfg.seed,
            "metrics": s.last_eval if s.last_eval_step == s.step else {},
            "config": {"resolved": run.resolved, "unresolved": OmegaConf.to_container(cfg, resolve=False)},
            "overrides": list(run.overrides),
            "command": provenance.command_line(),
            "data": data,
            "parent_sha256": self.last_sha,
            "resumed_from": str(resumed.dir) if resumed else None,
            "wall_time_s": round(self.wall_before + time.perf_counter() - self.started, 3),
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "wandb_id": self.wandb_id,
            **self.tracker_ids,
            "world_size": run.info.world,
            "parallel": run.parallel,
            "teacher": run.trainer.distill.teacher_info if run.trainer.distill is not None else None,
            **({"user_code": self.user_code} if self.user_code else {}),
            **({"weights": run.weights} if run.weights else {}),
            **({"finetune": run.finetuner.summary()} if run.finetuner is not None else {}),
            "io": _io(run),
            **self.env,
        }

    def save(self) -> None:
        run = self.run
        s, ck = run.state, run.cfg.checkpoint
        if self.last_step == s.step:
            return
        if ck.format == "sharded":  # every rank writes its own shard (trainrun.checkpoint_sharded): no full gather
            self._save_sharded()
            return
        self._finish_write()  # at most one write in flight; parent_sha256 below names a complete checkpoint
        t0 = time.perf_counter()
        state, meta = state_dict(run), self.meta()
        metric = s.last_eval.get(ck.monitor) if s.last_eval_step == s.step else None
        sha, path = None, None
        keep = dict(keep_last=ck.keep_last, mode=ck.monitor_mode, keep_best=ck.keep_best,
                    keep_every_n_steps=ck.keep_every_n_steps)
        if run.info.is_main and self.writer is not None:  # a host copy now; written while training goes on
            state, step = checkpoint.snapshot(state), s.step

            def write():
                try:
                    path, sha = checkpoint.write(run.dir, step, state, meta, metric)
                    checkpoint.publish(run.dir, path, metric, **keep)  # latest moves once the folder is complete
                    return step, path, sha
                finally:
                    checkpoint.release_snapshot(state)

            self.writer.submit(write)
            self.last_step = s.step
        elif run.info.is_main:  # one writer; every rank took part in gathering the state above
            path, sha = checkpoint.save(run.dir, s.step, state, meta, metric=metric, **keep)
        self.stall_s.append(time.perf_counter() - t0)
        distributed.barrier()
        if self.writer is None or not run.info.is_main:
            self._saved(s.step, path, sha)

    def _saved(self, step: int, path: Optional[Path], sha: Optional[str]) -> None:
        """A checkpoint is complete (or, on a rank that does not write, its save is over)."""
        self.last_sha, self.last_step = sha, step
        if path is not None and self.on_saved is not None:
            self.on_saved(step, sha)
        if path is not None:
            self.run.callbacks.call("on_checkpoint", self.run, step, path)

    def _finish_write(self) -> None:
        """Wait for the asynchronous write in flight, if any; its trackers and callbacks run here, on the training
        thread. A failed write raises its error (one line, like a synchronous save's)."""
        if self.writer is not None and self.writer.in_flight:
            self._saved(*self.writer.wait())

    def close(self, quiet: bool = False) -> None:
        """The end of training (finished, a signal, an error): the write in flight completes before the process
        exits, so the final checkpoint is the `latest` one. `quiet` (another error is on its way out): a failed
        write is a warning, not a second error."""
        try:
            self._finish_write()
        except Exception as e:  # noqa: BLE001
            if not quiet:
                raise
            logging.getLogger("trainrun").warning("the checkpoint being written when the run failed was not "
                                                  "completed (%s); latest names the previous one", e)

    def _save_sharded(self) -> None:
        from trainrun import checkpoint_sharded

        run = self.run
        s, ck = run.state, run.cfg.checkpoint
        metric = s.last_eval.get(ck.monitor) if s.last_eval_step == s.step else None
        path, sha = checkpoint_sharded.save(run, s.step, self.meta(), metric=metric, keep_last=ck.keep_last,
                                            mode=ck.monitor_mode, keep_best=ck.keep_best,
                                            keep_every_n_steps=ck.keep_every_n_steps)
        self.last_sha, self.last_step = sha, s.step
        if path is not None and self.on_saved is not None:
            self.on_saved(s.step, sha)
        if path is not None:
            run.callbacks.call("on_checkpoint", run, s.step, path)

    def save_badstep(self, report: Dict[str, Any]) -> Optional[Path]:
        """The state before the bad update (step = the bad step), with the report and the batch's sample indices."""
        run = self.run
        step = run.state.step + 1
        state = {**state_dict(run), "badstep": {k: v for k, v in report.items() if k != "activations"}}
        meta = {**self.meta(), "badstep": {k: report[k] for k in ("step", "problem", "batch_indices")}}
        path = checkpoint.save_badstep(run.dir, step, state, meta) if run.info.is_main else None
        distributed.barrier()
        return path


def _io(run: Run) -> Dict[str, Any]:
    """What trainrun.load needs to rebuild the model and feed it without the data: the input shape, the outputs,
    the class names and the preprocessing of raw inputs (trainrun.data.datasets.Split.preprocess)."""
    split = run.split
    return {"input_shape": [int(d) for d in split.input_shape], "num_classes": split.num_classes,
            "num_outputs": int(run.task.num_outputs), "task": run.cfg.task.name,
            "class_names": getattr(split, "class_names", None), "vocab_size": getattr(split, "vocab_size", None),
            "preprocess": _plain(getattr(split, "preprocess", None) or {})}


def _plain(value: Any) -> Any:
    """JSON values: a statistic given as a tensor or an array becomes a float or a list of floats."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _user_code_provenance(resolved: Dict[str, Any]) -> Dict[str, Any]:
    """Every `_target_` the config names -> where its code came from (file, SHA256, package version)."""
    from trainrun import usercode

    return {key: usercode.source_provenance(target) for key, target in usercode.config_targets(resolved).items()}
