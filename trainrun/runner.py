"""`run(cfg)`: validate -> seed -> build data, model, optimizer, schedule, precision -> restore -> fit -> summary.

Each arrow is one call into the module that owns it. Everything that can be checked (config values,
resume checkpoint, config compatibility, data) is checked before the first training step.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import logging
import secrets
import signal
import string
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from trainrun import checkpoint, distributed, provenance, rundir
from trainrun.config import validate
from trainrun.data import BatchStream, build_split, sample_inputs
from trainrun.diagnostics import memory_plan
from trainrun.doctor import Doctor, SummedLoss, TrainingHalted, overfit_settings, overfit_verdict, permute_labels
from trainrun.distill import Distiller, load_teacher
from trainrun.data.curriculum import Curriculum, score_samples
from trainrun.errors import CheckpointError, ConfigError
from trainrun.init import apply_init
from trainrun.logging import RunLogger, config_tree, console, print_metrics, trim_metrics, write_failure
from trainrun.loop import Trainer, TrainState, evaluate_all, fit, overfit_one_batch
from trainrun.models import build_model, check_forward, check_model_size
from trainrun.optim import apply_hparams, build_optimizer
from trainrun.precision import DTYPES, PrecisionPolicy
from trainrun.regularization import (EMA, BatchAugment, EarlyStopping, add_stochastic_depth, build_loss,
                                     class_weights, effective_dropout)
from trainrun.resume import (IGNORE_ON_RESUME, REFUSE_ON_CHANGE, adopt_checkpoint_config,  # noqa: F401
                             adopt_trained_sections, check_data, check_resume_compatible, check_state, config_changes,
                             load_resume)
from trainrun.schedule import Schedule, horizon_change
from trainrun.seed import capture_rng_state, restore_rng_state, seed_everything, set_determinism

log = logging.getLogger("trainrun")


def build_distiller(cfg, model, ema, split, device) -> Distiller:
    d = cfg.distillation
    if d.name == "self":
        teacher, info = ema.module, {"self": "EMA of the student", "ema_decay": cfg.regularization.ema_decay}
    else:
        teacher, info = load_teacher(d.teacher, split.input_shape, split.num_classes, d.teacher_weights,
                                     cfg.output_root)
        teacher.to(device)
        if info["data_fingerprint"] not in (None, split.fingerprint):
            log.warning("the teacher was trained on other data (fingerprint %s, student data %s)",
                        info["data_fingerprint"][:12], split.fingerprint[:12])
    return Distiller(d, model, teacher, sample_inputs(split.train, 8).to(device), info).to(device)


def pick_device(name: str, info: "distributed.DistInfo" = None) -> torch.device:
    local = info.local_rank if info is not None and info.enabled else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local is not None:
        name = f"cuda:{local}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available on this machine; use trainer.device=cpu")
    return dev


def _overfit_batch(cfg: DictConfig, trainer: Trainer, doctor: Doctor, run_dir: Path, logger: RunLogger) -> Dict:
    """mode=overfit_batch: can this model, loss and optimizer drive one fixed batch's loss to ~0?"""
    d = cfg.doctor
    try:
        logger.print(f"overfit_batch: one batch of {cfg.data.batch_size} training samples, up to {d.overfit_steps} "
                     f"steps, passes below loss {d.overfit_loss:g}")
        losses, norms, halted = overfit_one_batch(trainer, d.overfit_steps, d.overfit_loss)
        doctor.check_label_probe()
        verdict = overfit_verdict(losses, norms, d.overfit_loss, doctor.findings,
                                  trainer.optimizer.param_groups[0]["lr"], halted)
        verdict["findings"] = dict(doctor.findings)
        if distributed.env_info().is_main:
            (run_dir / "overfit_batch.json").write_text(json.dumps({**verdict, "losses": losses,
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


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout signal) / first Ctrl-C ask the loop to checkpoint at the next
    step boundary and exit."""

    def __init__(self):
        self.requested, self.signum, self._old = False, None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
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


def run(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]] = None,
        defaults: Optional[DictConfig] = None) -> Dict[str, float]:
    """`defaults`: the config composed without this command's overrides; given, a resume adopts the
    checkpoint's config (see adopt_checkpoint_config)."""
    t0 = time.perf_counter()
    validate(cfg)
    run_dir = Path(run_dir)
    overfit_changes = overfit_settings(cfg) if cfg.mode == "overfit_batch" else []
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resumed, resume_changes = None, []
    if cfg.resume:
        ckpt_dir, state_dict, meta = load_resume(cfg.resume, cfg)
        if cfg.mode == "train" and defaults is not None:
            cfg = adopt_checkpoint_config(cfg, defaults, list(overrides or []), meta["config"]["resolved"])
            validate(cfg)
            resolved = OmegaConf.to_container(cfg, resolve=True)
        if cfg.mode == "train":
            resume_changes = check_resume_compatible(meta["config"]["resolved"], resolved)
            for k, a, b in resume_changes:
                log.warning("resume with a changed config: %s %r -> %r", k, a, b)
        resumed = (ckpt_dir, state_dict, meta)
        if cfg.mode == "eval":  # evaluate the checkpoint as it was trained: its model, data and precision
            cfg = adopt_trained_sections(cfg, meta["config"]["resolved"], ("model", "data", "precision"))
            resolved = OmegaConf.to_container(cfg, resolve=True)
    elif cfg.mode == "eval":
        raise ConfigError("mode=eval needs a checkpoint: resume=<run dir or checkpoint dir>")
    elif checkpoint.list_checkpoints(run_dir):
        raise ConfigError(f"run directory {run_dir} already has checkpoints; continue it with resume={run_dir} "
                          "or pick another run_name")

    set_determinism(cfg.determinism)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    info = distributed.env_info()
    seed_everything(cfg.seed)  # the same on every rank: one data split, one initial model
    device = pick_device(cfg.trainer.device, info)

    split = build_split(cfg.data)
    data_changed_from = check_data(resumed[2], split.fingerprint, cfg.determinism, resumed[0], cfg.data.name,
                                   info.is_main) if resumed and cfg.mode == "train" else None
    if cfg.doctor.fault == "permuted_labels":
        permute_labels(split.train, cfg.seed)
    check_model_size(cfg.model, split.input_shape, split.num_classes, effective_dropout(cfg.regularization, cfg.model),
                     device)
    model = build_model(cfg.model, split.input_shape, split.num_classes,
                        effective_dropout(cfg.regularization, cfg.model))
    check_forward(model, cfg.model.name, split.input_shape, split.num_classes)
    apply_init(model, cfg.init, cfg.model.activation, batch=sample_inputs(split.train, cfg.data.batch_size))
    reg = cfg.regularization
    if reg.stochastic_depth > 0:
        add_stochastic_depth(model, reg.stochastic_depth)
    model.to(device, memory_format=torch.channels_last) if cfg.trainer.channels_last else model.to(device)
    if device.type == "cuda" and hasattr(split.train, "x"):  # small in-memory sets live on the GPU
        for ds in (split.train, split.val):
            ds.x, ds.y = ds.x.to(device), ds.y.to(device)
    parallel = cfg.trainer.parallel if info.enabled else "none"
    if parallel == "fsdp2" and reg.ema_decay > 0:
        raise ConfigError("regularization.ema_decay with trainer.parallel=fsdp2 is not supported yet (the EMA copy "
                          "would be sharded); use trainer.parallel=ddp or ema_decay=0")
    net = distributed.wrap(model, parallel, info, device, DTYPES[cfg.precision.name], cfg.trainer.sync_batchnorm)

    acc = cfg.trainer.accumulation_steps
    global_batch = cfg.data.batch_size * acc * info.world
    train = BatchStream(split.train, cfg.data.batch_size, cfg.seed, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        rank=info.rank, world=info.world, persistent_workers=cfg.data.persistent_workers,
                        prefetch_factor=cfg.data.prefetch_factor)
    val = BatchStream(split.val, cfg.data.eval_batch_size, cfg.seed, shuffle=False, drop_last=False,
                      num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.data.persistent_workers, prefetch_factor=cfg.data.prefetch_factor)
    if train.batches_per_epoch < acc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x trainer.accumulation_steps={acc} x "
                          f"{info.world} processes exceeds the {len(split.train)} training samples; lower one of them")
    steps_per_epoch = max(1, train.batches_per_epoch // acc)
    total = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch

    curriculum = Curriculum(cfg.curriculum, len(split.train), max(1, math.ceil(total / steps_per_epoch) - 1),
                            cfg.seed, getattr(split.train, "difficulty", None))

    optimizer = build_optimizer(model, cfg.optimizer, global_batch)
    schedule = Schedule(cfg.schedule, total, steps_per_epoch, monitor_mode=cfg.checkpoint.monitor_mode)
    precision = PrecisionPolicy(cfg.precision, device)
    weights = class_weights(reg, split.train.y, split.num_classes)
    loss_fn = build_loss(reg, weights).to(device)
    if cfg.doctor.fault == "reduction_sum":
        loss_fn = SummedLoss(loss_fn)
    augment = BatchAugment(reg, split.num_classes)
    ema = EMA(model, reg.ema_decay, reg.ema_warmup) if reg.ema_decay > 0 else None
    early = EarlyStopping(reg.early_stopping_patience, reg.early_stopping_min_delta, cfg.checkpoint.monitor_mode,
                          reg.restore_best) if reg.early_stopping_patience > 0 else None
    # The compiled module runs the steps; `net`/`model` stay the uncompiled owners of the weights, so
    # checkpoints, EMA and the doctor's hooks never see torch.compile's `_orig_mod.` prefix.
    runner_net = torch.compile(net, mode=cfg.trainer.compile_mode) if cfg.trainer.compile else net
    trainer = Trainer(runner_net, optimizer, schedule, precision, loss_fn, train, val, device, total, acc,
                      reg.clip_grad_norm, reg.clip_grad_value, augment if augment.enabled else None, ema,
                      world=info.world, zero_grad=cfg.doctor.fault != "no_zero_grad",
                      channels_last=cfg.trainer.channels_last)
    doc_cfg = cfg.doctor
    doctor = None
    if doc_cfg.nan_guard != "off" or doc_cfg.stats_every or doc_cfg.inject_nan_step or cfg.mode == "overfit_batch":
        stats = info.is_main and (doc_cfg.stats_every > 0 or cfg.mode == "overfit_batch")
        doctor = Doctor(doc_cfg, net, precision, loss_fn, split.num_classes, world=info.world,
                        reduce_sum=distributed.all_reduce_sum, stats_path=run_dir / "stats.jsonl" if stats else None,
                        lr=lambda: optimizer.param_groups[0]["lr"], probe_data=(split.train, split.val),
                        badsteps_path=run_dir / "badsteps.jsonl" if info.is_main else None)
        if cfg.mode == "overfit_batch" and not doc_cfg.stats_every:
            doctor.probe_every = 25
        trainer.doctor = doctor
    torch.autograd.set_detect_anomaly(bool(doc_cfg.detect_anomaly))
    if info.enabled:
        seed_everything(cfg.seed, info.rank)  # per-rank streams for dropout, MixUp, ... from here on
    if cfg.distillation.name != "off":
        trainer.distill = build_distiller(cfg, model, ema, split, device)
        if len(trainer.distill.proj):
            optimizer.add_param_group({"params": list(trainer.distill.proj.parameters()), "name": "distill_proj",
                                       "decay": True})
            apply_hparams(optimizer, cfg.optimizer, global_batch)
    if curriculum.enabled:
        def curriculum_order(epoch: int):
            # Scores come from the model at the start of the epoch; a mid-epoch resume reuses the saved ones.
            scores = None
            if curriculum.needs_scores and not curriculum.has_scores(epoch):
                scores = score_samples(net, split.train, curriculum.score_kind, precision, device,
                                       cfg.data.eval_batch_size)
            return curriculum.epoch_order(epoch, scores)

        train.order_fn = curriculum_order

    if resumed:  # everything the checkpoint holds fits this run, before any of it is used
        check_state(resumed[0], resumed[1], resumed[2], model, resume_changes,
                    optimizer if cfg.mode != "eval" else None, cfg.optimizer.name, trainer.distill)

    if cfg.mode == "init_report":
        from trainrun.diagnostics import activation_report, render_activation_report

        x = next(train.iter_epoch(0))[0].to(device)
        rows = activation_report(model, x)
        (run_dir / "init_report.json").write_text(json.dumps(rows, indent=2))
        render_activation_report(rows, console(), title=f"activations at init: model={cfg.model.name} init={cfg.init.name}")
        return {"layers": len(rows), "last_var": rows[-1]["var"] if rows else float("nan")}

    if cfg.mode == "lr_find":
        from trainrun.diagnostics import lr_find, plot_lr_find
        from trainrun.loop import micro_batches

        lf = cfg.lr_find
        result = lr_find(net, optimizer, micro_batches(trainer), loss_fn, precision, device, lf.start_lr,
                         lf.end_lr, lf.num_steps, lf.smooth, lf.diverge)
        if info.is_main:
            (run_dir / "lr_find.json").write_text(json.dumps(result, indent=2))
            plot_lr_find(result, run_dir / "lr_find.png")
            sugg = result["suggested_lr"]
            console().print(f"LR range test over {len(result['lrs'])} steps ({lf.start_lr:g} -> {lf.end_lr:g}): "
                            f"suggested optimizer.lr={sugg:.3g} (steepest descent), lowest loss at "
                            f"{result['min_loss_lr']:.3g}; plot: {run_dir / 'lr_find.png'}" if sugg else
                            "LR range test: no descent found; try a smaller lr_find.start_lr or more lr_find.num_steps")
        return {"suggested_lr": result["suggested_lr"], "finished": True}

    if cfg.mode == "eval":
        model.load_state_dict(resumed[1]["model"])
        if "ema" in resumed[1]:
            trainer.ema = trainer.ema or EMA(model, 0.0)
            trainer.ema.load_state_dict(resumed[1]["ema"])
        metrics = evaluate_all(trainer)
        (run_dir / "eval.json").write_text(json.dumps({"checkpoint": str(resumed[0]), "sha256": resumed[2]["sha256"],
                                                       "step": resumed[2]["step"], **metrics}, indent=2))
        print_metrics(console(), f"eval of {resumed[0]}", {"step": resumed[2]["step"], **metrics})
        return {**metrics, "finished": True}

    parent_sha, wall_before, wandb_id = None, 0.0, None
    if resumed:
        ckpt_dir, st, meta = resumed
        try:
            distributed.load_full_state(net, optimizer, st["model"], st["optimizer"], parallel)
        except ValueError as e:
            raise ConfigError(f"resume refused: the optimizer state does not fit this config ({e}); resume with the "
                              "checkpoint's optimizer settings or start a new run") from e
        apply_hparams(optimizer, cfg.optimizer, global_batch)  # a changed LR/decay takes effect
        precision.load_state_dict(st["scaler"])
        schedule.load_state_dict(st["schedule"])
        for name, part in (("ema", ema), ("early_stopping", early),
                           ("curriculum", curriculum if curriculum.enabled else None), ("distill", trainer.distill)):
            if part is not None and name in st:
                part.load_state_dict(st[name])
            elif part is not None:
                log.warning("resume: the checkpoint has no %s state; %s starts afresh", name, name)
        trainer.state = TrainState(**st["trainer"])
        reshaped = horizon_change(cfg.schedule, st["schedule"], schedule, steps_per_epoch, trainer.state.step,
                                  optimizer.param_groups[0]["base_lr"])
        if reshaped:
            log.warning(reshaped)
        saved_world = meta.get("world_size", 1)
        if saved_world != info.world:
            log.warning("resume on another world size (%d -> %d processes): the global batch becomes %d, each rank's "
                        "data shard and RNG stream change, so the trajectory will differ from the original run",
                        saved_world, info.world, global_batch)
            if info.is_main:
                print(f"warning: resume on another world size ({saved_world} -> {info.world}); the trajectory "
                      "changes from here", flush=True)
        per_rank = st.get("rng_per_rank")
        restore_rng_state(per_rank[info.rank] if per_rank and len(per_rank) == info.world else st["rng"])
        parent_sha, wall_before, wandb_id = meta["sha256"], meta.get("wall_time_s", 0.0), meta.get("wandb_id")
        if info.is_main:
            trim_metrics(run_dir, trainer.state.step)
    schedule.apply(optimizer, trainer.state.step)
    if cfg.logger.name == "wandb" and wandb_id is None:
        wandb_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))

    # Every check has passed: only now is the run directory touched (a fresh run clears what an earlier attempt
    # left before its first checkpoint; config.yaml always holds this process's config; trainrun.log opens).
    try:
        cleared = rundir.accept(run_dir, OmegaConf.to_yaml(cfg, resolve=True), fresh=not resumed,
                                main_process=info.is_main)
    except OSError as e:  # a full disk before the first step: one line, and no resume= to suggest
        (run_dir / f".{rundir.CONFIG_FILE}.tmp").unlink(missing_ok=True)  # what write_config had begun
        raise write_failure(Path(e.filename or run_dir / rundir.CONFIG_FILE), e, run_dir) from e
    logger = RunLogger(cfg.logger, run_dir, total, trainer.state.step, resolved, wandb_id, main_process=info.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    logger.print(f"[bold]trainrun[/] run dir: {run_dir}")
    if cleared:
        logger.print(f"{run_dir} held an earlier attempt that stopped before its first checkpoint: started over "
                     f"(removed {', '.join(cleared)})")
    if not resumed:
        from trainrun.config import TrainrunConfig

        logger.print(config_tree(cfg, OmegaConf.structured(TrainrunConfig)))
    logger.print(f"data: {split.description}")
    plan = memory_plan(model, cfg.optimizer.name, cfg.optimizer.momentum, cfg.precision.name,
                       shards=info.world if parallel == "fsdp2" else 1)
    mb = 1024 ** 2
    sharded = f" per rank (FSDP2 shards weights, grads and optimizer state over {info.world} ranks)" \
        if plan["shards"] > 1 else ""
    logger.print(f"memory plan{sharded}: {plan['params']:,} params x {plan['bytes_per_param']:.1f} B/param = "
                 f"{plan['total'] / mb:.2f} MiB (weights {plan['weights'] / mb:.2f}, grads {plan['grads'] / mb:.2f}, "
                 f"optimizer state {plan['optimizer_state'] / mb:.2f}; master copy: {plan['master_copy']}) "
                 "+ activations; measured peak logged as peak_mem_mb")
    logger.print(f"model: {cfg.model.name} ({n_params:,} params) | optimizer: {cfg.optimizer.name} "
                 f"lr {optimizer.param_groups[0]['base_lr']:.4g} | schedule: {cfg.schedule.name} | precision: "
                 f"{cfg.precision.name} | device: {device}, {torch.get_num_threads()} CPU threads "
                 f"| global batch {global_batch}"
                 + (f" ({cfg.data.batch_size} per rank x {info.world} ranks x {acc} accumulation, {parallel})"
                    if info.enabled else "") + f" | {total} steps")
    if resumed:
        logger.print(f"resumed from {resumed[0]} at step {trainer.state.step} (epoch {trainer.state.epoch}, "
                     f"batch {trainer.state.batch_in_epoch})")

    stop_at = min(total, cfg.trainer.stop_at_step or total)
    last_saved = {"sha": parent_sha, "step": trainer.state.step if resumed else None}
    env = provenance.environment()
    train_start = time.perf_counter()
    monitor, mode = cfg.checkpoint.monitor, cfg.checkpoint.monitor_mode

    def on_eval(metrics: Dict[str, float]) -> None:
        trainer.state.last_eval_step = trainer.state.step
        if doctor is not None:
            doctor.on_eval(trainer.state.step, metrics.get("val/acc"))
        value = metrics.get(monitor)
        schedule.on_eval(value)
        if value is not None and checkpoint.is_better(value, trainer.state.best_metric, mode):
            trainer.state.best_metric = value
        # keep the weights that were measured: val/* comes from the EMA copy when EMA is on
        if early is not None and early.step(value, trainer.state.step, ema.module if ema is not None else model):
            trainer.state.stopped_early = True
            logger.print(f"early stopping at step {trainer.state.step}: no {monitor} improvement over "
                         f"{early.min_delta} for {early.patience} evaluations (best {early.best} at step {early.best_step})")
            if early.best_weights is not None:
                model.load_state_dict(early.best_weights)
                if ema is not None:  # both copies now hold the EMA weights that were measured best
                    ema.module.load_state_dict(early.best_weights)
                trainer.state.last_eval = evaluate_all(trainer)
                logger.print(f"restored the best weights (step {early.best_step})")

    def state_now() -> Dict[str, Any]:
        s = trainer.state
        state = {
            "model": distributed.full_model_state(net, parallel),
            "optimizer": distributed.full_optimizer_state(net, optimizer, parallel),
            "schedule": schedule.state_dict(),
            "scaler": precision.state_dict(),
            "trainer": s.to_dict(),
            "rng": capture_rng_state(),
            **({"rng_per_rank": distributed.all_gather_object(capture_rng_state())} if info.enabled else {}),
            "data": {"seed": cfg.seed, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch},
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        if early is not None:
            state["early_stopping"] = early.state_dict()
        if curriculum.enabled:
            state["curriculum"] = curriculum.state_dict()
        if trainer.distill is not None:
            state["distill"] = trainer.distill.state_dict()
        return state

    def meta_now() -> Dict[str, Any]:
        s = trainer.state
        return {
            "run_dir": str(run_dir.resolve()),
            "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "total_steps": total, "seed": cfg.seed,
            "metrics": s.last_eval if s.last_eval_step == s.step else {},
            "config": {"resolved": resolved, "unresolved": OmegaConf.to_container(cfg, resolve=False)},
            "overrides": list(overrides or []),
            "command": provenance.command_line(),
            "data": {"name": cfg.data.name, "fingerprint": split.fingerprint, "description": split.description,
                     **({"fingerprint_changed_from": data_changed_from} if data_changed_from else {})},
            "parent_sha256": last_saved["sha"],
            "resumed_from": str(resumed[0]) if resumed else None,
            "wall_time_s": round(wall_before + time.perf_counter() - train_start, 3),
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "wandb_id": wandb_id,
            "world_size": info.world,
            "parallel": parallel,
            "teacher": trainer.distill.teacher_info if trainer.distill is not None else None,
            **env,
        }

    def save() -> None:
        s = trainer.state
        if last_saved["step"] == s.step:
            return
        state, meta = state_now(), meta_now()
        metric = s.last_eval.get(monitor) if s.last_eval_step == s.step else None
        sha = None
        if info.is_main:  # one writer; every rank took part in gathering the state above
            _, sha = checkpoint.save(run_dir, s.step, state, meta, keep_last=cfg.checkpoint.keep_last,
                                     metric=metric, mode=mode, keep_best=cfg.checkpoint.keep_best)
        distributed.barrier()
        last_saved.update(sha=sha, step=s.step)

    def save_badstep(report: Dict[str, Any]) -> Optional[Path]:
        """The state before the bad update (step = the bad step), with the report and the batch's sample indices."""
        step = trainer.state.step + 1
        state = {**state_now(), "badstep": {k: v for k, v in report.items() if k != "activations"}}
        meta = {**meta_now(), "badstep": {k: report[k] for k in ("step", "problem", "batch_indices")}}
        path = checkpoint.save_badstep(run_dir, step, state, meta) if info.is_main else None
        distributed.barrier()
        return path

    if doctor is not None:
        doctor.save_badstep, doctor.say = save_badstep, logger.print
        doctor.log = logger.log_stats if info.is_main else None
    if cfg.mode == "overfit_batch":
        if overfit_changes:
            logger.print("overfit_batch turned off: " + "; ".join(overfit_changes))
        return _overfit_batch(cfg, trainer, doctor, run_dir, logger)

    exit_code = 1
    try:
        already_done = trainer.state.step >= total or trainer.state.stopped_early
        if already_done:
            logger.print(f"run already complete at step {trainer.state.step}/{total}; nothing to do")
        with _StopFlag() as stop:
            already_done or fit(trainer, log_every=cfg.logger.log_every,
                                eval_every=cfg.trainer.eval_every or steps_per_epoch,
                                ckpt_every=cfg.trainer.ckpt_every or steps_per_epoch, stop_at=stop_at,
                                log=logger.log, on_eval=on_eval, save=save, advance=logger.advance,
                                should_stop=lambda: distributed.any_rank(
                                    stop.requested or trainer.state.stopped_early, device))
        final = {"step": trainer.state.step, **trainer.state.last_eval}
        if trainer.state.best_metric is not None:
            final[f"best {monitor}"] = trainer.state.best_metric
        final["wall_time_s"] = round(time.perf_counter() - t0, 2)
        done = trainer.state.step >= total or trainer.state.stopped_early
        logger.summary("trainrun: finished" if done else f"trainrun: stopped at step {trainer.state.step}/{total} "
                       f"(checkpointed; resume={run_dir} continues)", final)
        if cfg.logger.plots and info.is_main:
            from trainrun.plots import plot_finished

            plot_finished(run_dir)
        exit_code = 0
        return {**final, "finished": done, "signal": None if done else stop.signum}
    finally:
        logger.close(exit_code)
