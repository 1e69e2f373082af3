"""What the modes that train share: accepting the run directory, the logger and its header, and checkpointing.

Only here is the run directory touched: every check has passed by the time `open_session` runs.
"""
from __future__ import annotations

import datetime as dt
import secrets
import string
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf

from trainrun import checkpoint, distributed, provenance, rundir
from trainrun.build import Run, state_dict
from trainrun.diagnostics import memory_plan
from trainrun.logging import RunLogger, config_tree, write_failure


def open_session(run: Run) -> Tuple[RunLogger, "Checkpointer"]:
    """Accept the run directory (a fresh run clears what an earlier attempt left before its first checkpoint;
    config.yaml always holds this process's config; trainrun.log opens), then the logger and the run header."""
    cfg, info, resumed = run.cfg, run.info, run.resumed
    run.schedule.apply(run.optimizer, run.state.step)
    wandb_id = resumed.meta.get("wandb_id") if resumed else None
    if cfg.logger.name == "wandb" and wandb_id is None:
        wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        cleared = rundir.accept(run.dir, OmegaConf.to_yaml(cfg, resolve=True), fresh=not resumed,
                                main_process=info.is_main)
    except OSError as e:  # a full disk before the first step: one line, and no resume= to suggest
        (run.dir / f".{rundir.CONFIG_FILE}.tmp").unlink(missing_ok=True)  # what write_config had begun
        raise write_failure(Path(e.filename or run.dir / rundir.CONFIG_FILE), e, run.dir) from e
    logger = RunLogger(cfg.logger, run.dir, run.total, run.state.step, run.resolved, wandb_id,
                       main_process=info.is_main)
    _print_header(run, logger, cleared)
    return logger, Checkpointer(run, wandb_id)


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
            "+ activations; measured peak logged as peak_mem_mb")


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
        resumed = run.resumed
        self.last_sha = resumed.meta["sha256"] if resumed else None
        self.last_step = run.state.step if resumed else None
        self.wall_before = resumed.meta.get("wall_time_s", 0.0) if resumed else 0.0
        self.started = time.perf_counter()
        self.env = provenance.environment()
        self.user_code = _user_code_provenance(run.resolved)

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
            "world_size": run.info.world,
            "parallel": run.parallel,
            "teacher": run.trainer.distill.teacher_info if run.trainer.distill is not None else None,
            **({"user_code": self.user_code} if self.user_code else {}),
            **({"weights": run.weights} if run.weights else {}),
            **({"finetune": run.finetuner.summary()} if run.finetuner is not None else {}),
            **self.env,
        }

    def save(self) -> None:
        run = self.run
        s, ck = run.state, run.cfg.checkpoint
        if self.last_step == s.step:
            return
        state, meta = state_dict(run), self.meta()
        metric = s.last_eval.get(ck.monitor) if s.last_eval_step == s.step else None
        sha, path = None, None
        if run.info.is_main:  # one writer; every rank took part in gathering the state above
            path, sha = checkpoint.save(run.dir, s.step, state, meta, keep_last=ck.keep_last, metric=metric,
                                        mode=ck.monitor_mode, keep_best=ck.keep_best)
        distributed.barrier()
        self.last_sha, self.last_step = sha, s.step
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


def _user_code_provenance(resolved: Dict[str, Any]) -> Dict[str, Any]:
    """Every `_target_` the config names -> where its code came from (file, SHA256, package version)."""
    from trainrun import usercode

    return {key: usercode.source_provenance(target) for key, target in usercode.config_targets(resolved).items()}
