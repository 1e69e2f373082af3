"""`build(cfg) -> Run`: every component of a run, built in a fixed order from its config section; `restore(run)`
loads a checkpoint into it; `state_dict(run)` gathers what a checkpoint holds.

Every stateful part registers under a name (`Run.parts`), so saving is one loop over the parts and restoring the
mirror loop: a user callback with `state_dict`/`load_state_dict` joins the checkpoint contract by being
configured, with no list kept by hand. The build order is part of the exact-resume contract: components that draw
random numbers at construction (the model, its init, distillation projections) are built in the same order on every
run, so a run with the same config starts from the same weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from trainrun import distributed
from trainrun.callbacks import Callbacks
from trainrun.data import BatchStream, build_split, sample_inputs
from trainrun.data.curriculum import Curriculum, score_samples
from trainrun.distill import Distiller, load_teacher
from trainrun.doctor import Doctor, permute_labels
from trainrun.errors import ConfigError
from trainrun.init import apply_init
from trainrun.logging import trim_metrics
from trainrun.loop import Trainer, TrainState
from trainrun.models import build_model, check_forward, check_model_size, model_label
from trainrun.optim import apply_hparams, build_optimizer
from trainrun.precision import DTYPES, PrecisionPolicy
from trainrun.regularization import EMA, BatchAugment, EarlyStopping, add_stochastic_depth, effective_dropout
from trainrun.resume import WEIGHTS_MODES, check_data, check_state
from trainrun.schedule import Schedule, horizon_change
from trainrun.seed import capture_rng_state, restore_rng_state, seed_everything
from trainrun.tasks import Task, model_classes
from trainrun.tasks.build import build_task

log = logging.getLogger("trainrun")


@dataclass
class Resumed:
    """The checkpoint a run continues (or evaluates): already verified and unpickled by resume.load_resume."""
    dir: Path
    state: Dict[str, Any]
    meta: Dict[str, Any]
    changes: list = field(default_factory=list)  # (key, old, new) config changes this command makes


@dataclass
class Part:
    """One named entry of a checkpoint. `load(value, checkpoint_state)`; None: restored with another part or
    derived. `optional`: an older checkpoint may lack it (the part starts afresh, with a warning). `last`: restored
    after every other part (the RNG states: nothing may draw random numbers after them)."""
    save: Callable[[], Any]
    load: Optional[Callable[[Any, Dict[str, Any]], None]] = None
    optional: bool = False
    last: bool = False


@dataclass
class Run:
    cfg: DictConfig
    dir: Path
    info: distributed.DistInfo
    device: torch.device
    split: Any  # trainrun.data.Split
    task: Task
    model: nn.Module  # the weights' owner (no wrapper, no compile)
    net: nn.Module  # the model as trained: wrapped in DDP / FSDP2 under torchrun
    parallel: str
    trainer: Trainer
    curriculum: Curriculum
    early: Optional[EarlyStopping]
    doctor: Optional[Doctor]
    callbacks: Callbacks
    resolved: Dict[str, Any]
    resumed: Optional[Resumed] = None
    data_changed_from: Optional[str] = None
    parts: Dict[str, Part] = field(default_factory=dict)
    overrides: list = field(default_factory=list)  # this command's overrides (meta.json)
    overfit_changes: list = field(default_factory=list)  # mode=overfit_batch: the settings it turned off
    total: int = 0
    steps_per_epoch: int = 1
    global_batch: int = 0
    finetuner: Any = None  # trainrun.finetune.Finetuner: which parameters train, LoRA, the unfreeze stages
    weights: Optional[Dict[str, Any]] = None  # where the starting weights came from (meta.json's "weights")
    lr_layers: Dict[str, Any] = field(default_factory=dict)  # parameter name -> LR layer (layer decay, head_lr)
    lr_scales: Dict[Any, float] = field(default_factory=dict)  # LR layer -> factor on the LR

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def schedule(self) -> Schedule:
        return self.trainer.schedule

    @property
    def precision(self) -> PrecisionPolicy:
        return self.trainer.precision

    @property
    def ema(self) -> Optional[EMA]:
        return self.trainer.ema

    @property
    def state(self) -> TrainState:
        return self.trainer.state


def pick_device(name: str, info: Optional[distributed.DistInfo] = None) -> torch.device:
    local = info.local_rank if info is not None and info.enabled else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local is not None:
        name = f"cuda:{local}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available on this machine; use trainer.device=cpu")
    return dev


def build(cfg: DictConfig, run_dir: Path, resumed: Optional[Resumed] = None,
          resolved: Optional[Dict[str, Any]] = None) -> Run:
    """Everything a mode needs, checked before any of it runs: the data, the task, the model, the training
    machinery, the doctor and the callbacks; with `resumed`, whether the checkpoint fits all of it."""
    info = distributed.env_info()
    seed_everything(cfg.seed)  # the same on every rank: one data split, one initial model
    device = pick_device(cfg.trainer.device, info)
    split, task = _build_data_and_task(cfg, device)
    data_changed_from = check_data(resumed.meta, split.fingerprint, cfg.determinism, resumed.dir, _data_label(cfg),
                                   info.is_main) if resumed and cfg.mode == "train" else None
    if cfg.doctor.fault == "permuted_labels":
        permute_labels(split.train, cfg.seed)
    model, finetuner, weights = _build_model(cfg, split, task, device, info, resumed)
    parallel = cfg.trainer.parallel if info.enabled else "none"
    if parallel == "fsdp2" and cfg.regularization.ema_decay > 0:
        raise ConfigError("regularization.ema_decay with trainer.parallel=fsdp2 is not supported yet (the EMA copy "
                          "would be sharded); use trainer.parallel=ddp or ema_decay=0")
    if cfg.checkpoint.format == "sharded":
        from trainrun.checkpoint_sharded import check_run

        check_run(cfg, parallel)
    net = distributed.wrap(model, parallel, info, device, DTYPES[cfg.precision.name], cfg.trainer.sync_batchnorm)
    run = _build_training(cfg, run_dir, info, device, split, task, model, net, parallel, finetuner)
    run.resumed, run.data_changed_from = resumed, data_changed_from
    run.weights = weights if weights is not None or resumed is None else resumed.meta.get("weights")
    if resumed and finetuner is not None:  # the checkpoint's optimizer has the groups of the stages already due
        _unfreeze_due(run, _saved_step(resumed.state))
    run.resolved = resolved if resolved is not None else OmegaConf.to_container(cfg, resolve=True)
    _register_parts(run)
    if resumed:  # everything the checkpoint holds fits this run, before any of it is used
        check_state(resumed.dir, resumed.state, resumed.meta, model, resumed.changes,
                    run.optimizer if cfg.mode not in WEIGHTS_MODES else None, cfg.optimizer.name,
                    run.trainer.distill)
    return run


def _data_label(cfg) -> str:
    return cfg.data._target_ if cfg.data.get("_target_") else cfg.data.name


def _build_data_and_task(cfg: DictConfig, device: torch.device):
    from trainrun.tasks.build import task_classifies

    classifies = task_classifies(cfg.task)
    if cfg.data.get("_target_"):
        from trainrun.data.user import build_user_split

        split = build_user_split(cfg.data, classifies)
    else:
        split = build_split(cfg.data, classifies)
    task = build_task(cfg, split, device)
    return split, task


def _build_model(cfg: DictConfig, split, task: Task, device: torch.device, info, resumed: Optional[Resumed]):
    """The model with its init, its starting weights (model.pretrained / model.weights; not when resuming: the
    checkpoint holds the weights) and its finetune setup (frozen parameters, LoRA), on `device`.
    Returns (model, finetuner or None, the weights' provenance or None)."""
    dropout = effective_dropout(cfg.regularization, cfg.model)
    classes = model_classes(task, split)
    if not cfg.model.get("_target_"):  # a user model is not built twice (its factory may be slow or stateful)
        check_model_size(cfg.model, split.input_shape, classes, dropout, device)
    model = build_model(cfg.model, split.input_shape, classes, dropout, num_outputs=task.num_outputs)
    check_forward(model, model_label(cfg.model), split.input_shape, classes, task,
                  getattr(getattr(split.train, "x", None), "dtype", None))
    apply_init(model, cfg.init, cfg.model.activation, batch=sample_inputs(split.train, cfg.data.batch_size))
    weights = None
    if resumed is None and (cfg.model.get("pretrained") or cfg.model.get("weights")):
        from trainrun.models.weights import load_initial_weights

        weights = load_initial_weights(model, cfg.model, split.input_shape[0])
    if cfg.regularization.stochastic_depth > 0:
        add_stochastic_depth(model, cfg.regularization.stochastic_depth)
    finetuner = _build_finetuner(cfg, model, len(split.train), info)
    if cfg.trainer.activation_checkpointing:  # hooks on each block: module tree and state_dict keys unchanged
        from trainrun.models.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    model.to(device, memory_format=torch.channels_last) if cfg.trainer.channels_last else model.to(device)
    if device.type == "cuda" and hasattr(split.train, "x"):  # small in-memory sets live on the GPU
        for ds in (split.train, split.val):
            ds.x, ds.y = ds.x.to(device), ds.y.to(device)
    return model, finetuner, weights


def _build_finetuner(cfg: DictConfig, model: nn.Module, train_samples: int, info):
    """finetune.*: freeze, LoRA, the unfreeze stages (None when the section asks for nothing)."""
    ft = cfg.finetune
    if not (ft.freeze or ft.unfreeze_at or ft.lora_rank > 0):
        return None
    from trainrun.finetune import Finetuner

    if cfg.finetune.unfreeze_at and info.enabled:
        raise ConfigError("finetune.unfreeze_at under torchrun is not supported yet (DDP registers the trainable "
                          "parameters when it wraps the model); unfreeze in a single-process run or drop it")
    batches = train_samples // (cfg.data.batch_size * info.world)  # what BatchStream gives per epoch
    finetuner = Finetuner(cfg.finetune, model, max(1, batches // cfg.trainer.accumulation_steps))
    finetuner.prepare()
    return finetuner


def _saved_step(state: Dict[str, Any]) -> int:
    """The optimizer steps a checkpoint had taken (check_state vets the value; here only what is usable)."""
    trainer = state.get("trainer") if isinstance(state, dict) else None
    step = trainer.get("step") if isinstance(trainer, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0


def _unfreeze_due(run: "Run", step: int) -> None:
    """Unfreeze every stage due at `step`: its parameters train from this step on, in new optimizer groups."""
    from trainrun.optim import add_param_groups

    finetuner = run.finetuner
    for stage in finetuner.due(step):
        params = finetuner.unfreeze(stage)
        newly = {id(p) for p in params}
        names = {n for n, p in run.model.named_parameters() if id(p) in newly}
        added = add_param_groups(run.optimizer, run.model, run.cfg.optimizer, names, run.global_batch,
                                 run.lr_layers, run.lr_scales, label=f"[unfrozen@{stage[0]}]")
        run.trainer.params = [p for p in run.model.parameters() if p.requires_grad]
        log.info("finetune: step %d: %d parameter tensors unfreeze (%s params) into %d new optimizer groups",
                 step, len(params), f"{sum(p.numel() for p in params):,}", added)
    run.schedule.apply(run.optimizer, step)  # the new groups' LR for the coming step


def _streams(cfg: DictConfig, split, info, device: torch.device) -> Tuple[BatchStream, BatchStream]:
    data = cfg.data
    common = dict(num_workers=data.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=data.persistent_workers, prefetch_factor=data.prefetch_factor)
    train = BatchStream(split.train, data.batch_size, cfg.seed, shuffle=True, drop_last=True, rank=info.rank,
                        world=info.world, **common)
    val = BatchStream(split.val, data.eval_batch_size, cfg.seed, shuffle=False, drop_last=False, **common)
    return train, val


def _build_training(cfg, run_dir, info, device, split, task, model, net, parallel, finetuner=None) -> Run:
    acc, reg = cfg.trainer.accumulation_steps, cfg.regularization
    global_batch = cfg.data.batch_size * acc * info.world
    train, val = _streams(cfg, split, info, device)
    if train.batches_per_epoch < acc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x trainer.accumulation_steps={acc} x "
                          f"{info.world} processes exceeds the {len(split.train)} training samples; lower one of them")
    steps_per_epoch = max(1, train.batches_per_epoch // acc)
    total = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch
    curriculum = Curriculum(cfg.curriculum, len(split.train), max(1, math.ceil(total / steps_per_epoch) - 1),
                            cfg.seed, getattr(split.train, "difficulty", None))
    lr_layers, lr_scales = _lr_layers(cfg, model, finetuner)
    optimizer = build_optimizer(model, cfg.optimizer, global_batch, lr_layers, lr_scales)
    schedule = Schedule(cfg.schedule, total, steps_per_epoch, monitor_mode=cfg.checkpoint.monitor_mode)
    precision = PrecisionPolicy(cfg.precision, device)
    augment = BatchAugment(reg, split.num_classes)  # validate() allows MixUp/CutMix only for tasks that mix targets
    ema = EMA.from_config(model, reg, global_batch, total / steps_per_epoch, schedule.warmup)  # None when off
    early = EarlyStopping(reg.early_stopping_patience, reg.early_stopping_min_delta, cfg.checkpoint.monitor_mode,
                          reg.restore_best) if reg.early_stopping_patience > 0 else None
    # The compiled module runs the steps; `net`/`model` stay the uncompiled owners of the weights, so
    # checkpoints, EMA and the doctor's hooks never see torch.compile's `_orig_mod.` prefix.
    runner_net = torch.compile(net, mode=cfg.trainer.compile_mode) if cfg.trainer.compile else net
    trainer = Trainer(runner_net, optimizer, schedule, precision, task.loss_fn, train, val, device, total, acc,
                      reg.clip_grad_norm, reg.clip_grad_value, augment if augment.enabled else None, ema,
                      world=info.world, zero_grad=cfg.doctor.fault != "no_zero_grad",
                      channels_last=cfg.trainer.channels_last, task=task)
    run = Run(cfg, Path(run_dir), info, device, split, task, model, net, parallel, trainer, curriculum, early,
              None, _build_callbacks(cfg), {}, total=total, steps_per_epoch=steps_per_epoch, global_batch=global_batch,
              finetuner=finetuner, lr_layers=lr_layers, lr_scales=lr_scales)
    if finetuner is not None and finetuner.stages:
        if finetuner.steps_per_epoch != steps_per_epoch:
            raise AssertionError(f"finetune stages planned for {finetuner.steps_per_epoch} steps per epoch, "
                                 f"the run has {steps_per_epoch}")
        trainer.before_step = lambda step: _unfreeze_due(run, step) if finetuner.due(step) else None
    run.doctor = _build_doctor(run)
    torch.autograd.set_detect_anomaly(bool(cfg.doctor.detect_anomaly))
    if info.enabled:
        seed_everything(cfg.seed, info.rank)  # per-rank streams for dropout, MixUp, ... from here on
    if cfg.distillation.name != "off":
        _attach_distiller(run)
    if curriculum.enabled:
        train.order_fn = _curriculum_order(run)
    return run


def _lr_layers(cfg: DictConfig, model: nn.Module, finetuner) -> Tuple[Dict[str, Any], Dict[Any, float]]:
    """finetune.layer_decay / head_lr: each parameter's LR layer and each layer's factor (trainrun.optim)."""
    ft = cfg.finetune
    if ft.layer_decay is None and ft.head_lr is None:
        return {}, {}
    from trainrun.finetune import head_names, layer_ids
    from trainrun.optim import layer_lr_scales

    ids, num_layers = layer_ids(model) if ft.layer_decay is not None else ({}, 1)
    return layer_lr_scales(ids, num_layers, ft.layer_decay, head_names(model), ft.head_lr, cfg.optimizer.lr)


def _build_doctor(run: Run) -> Optional[Doctor]:
    cfg, doc_cfg, info = run.cfg, run.cfg.doctor, run.info
    if not (doc_cfg.nan_guard != "off" or doc_cfg.stats_every or doc_cfg.inject_nan_step
            or cfg.mode == "overfit_batch"):
        return None
    stats = info.is_main and (doc_cfg.stats_every > 0 or cfg.mode == "overfit_batch")
    optimizer, task = run.optimizer, run.task
    doctor = Doctor(doc_cfg, run.net, run.precision, task.loss, run.split.num_classes if task.classifies else None,
                    world=info.world, reduce_sum=distributed.all_reduce_sum,
                    stats_path=run.dir / "stats.jsonl" if stats else None,
                    lr=lambda: optimizer.param_groups[0]["lr"], probe_data=(run.split.train, run.split.val),
                    badsteps_path=run.dir / "badsteps.jsonl" if info.is_main else None,
                    initial_loss=task.initial_loss())
    if cfg.mode == "overfit_batch" and not doc_cfg.stats_every:
        doctor.probe_every = 25
    run.trainer.doctor = doctor
    return doctor


def _attach_distiller(run: Run) -> None:
    cfg, split, device = run.cfg, run.split, run.device
    d = cfg.distillation
    if d.name == "self":
        teacher, info = run.ema.module, {"self": "EMA of the student", "ema_decay": cfg.regularization.ema_decay}
    else:
        teacher, info = load_teacher(d.teacher, split.input_shape, split.num_classes, d.teacher_weights,
                                     cfg.output_root)
        teacher.to(device)
        if info["data_fingerprint"] not in (None, split.fingerprint):
            log.warning("the teacher was trained on other data (fingerprint %s, student data %s)",
                        info["data_fingerprint"][:12], split.fingerprint[:12])
    distiller = Distiller(d, run.model, teacher, sample_inputs(split.train, 8).to(device), info).to(device)
    run.trainer.distill = distiller
    if len(distiller.proj):
        run.optimizer.add_param_group({"params": list(distiller.proj.parameters()), "name": "distill_proj",
                                       "decay": True})
        apply_hparams(run.optimizer, cfg.optimizer, run.global_batch, run.lr_scales)


def _curriculum_order(run: Run) -> Callable[[int], torch.Tensor]:
    curriculum, cfg = run.curriculum, run.cfg

    def order(epoch: int) -> torch.Tensor:
        # Scores come from the model at the start of the epoch; a mid-epoch resume reuses the saved ones.
        scores = None
        if curriculum.needs_scores and not curriculum.has_scores(epoch):
            scores = score_samples(run.net, run.split.train, curriculum.score_kind, run.precision, run.device,
                                   cfg.data.eval_batch_size)
        return curriculum.epoch_order(epoch, scores)

    return order


def _build_callbacks(cfg: DictConfig) -> Callbacks:
    from trainrun import usercode

    named = {}
    for name, node in (cfg.callbacks or {}).items():
        key = f"callbacks.{name}"
        if node is None:  # `+callbacks.NAME=null` switches off a callback a resumed run's stored config names
            continue
        if not isinstance(node, DictConfig) or not node.get("_target_"):
            raise ConfigError(f"{key}: a callback is {{_target_: pkg.module.Callback, ...its arguments}}; got "
                              f"{OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
        named[str(name)] = usercode.call_factory(node, f"{key}._target_", (), {})
    return Callbacks(named)


def _register_parts(run: Run) -> None:
    """The checkpoint's entries, in the order they are saved (the order is part of the file's bytes)."""
    net, optimizer, parallel, trainer = run.net, run.optimizer, run.parallel, run.trainer
    cfg, info = run.cfg, run.info

    def load_model_and_optimizer(value, state):
        try:
            distributed.load_full_state(net, optimizer, state["model"], value, parallel)
        except ValueError as e:
            raise ConfigError(f"resume refused: the optimizer state does not fit this config ({e}); resume with the "
                              "checkpoint's optimizer settings or start a new run") from e
        apply_hparams(optimizer, cfg.optimizer, run.global_batch, run.lr_scales)  # a changed LR/decay takes effect

    def load_trainer(value, state):
        trainer.state = TrainState(**value)

    def load_rng(value, state):
        per_rank = state.get("rng_per_rank")
        restore_rng_state(per_rank[info.rank] if per_rank and len(per_rank) == info.world else value)

    parts = run.parts
    parts["model"] = Part(lambda: distributed.full_model_state(net, parallel))  # loaded with the optimizer
    parts["optimizer"] = Part(lambda: distributed.full_optimizer_state(net, optimizer, parallel),
                              load_model_and_optimizer)
    parts["schedule"] = Part(run.schedule.state_dict, lambda v, s: run.schedule.load_state_dict(v))
    parts["scaler"] = Part(run.precision.state_dict, lambda v, s: run.precision.load_state_dict(v))
    parts["trainer"] = Part(lambda: trainer.state.to_dict(), load_trainer)
    parts["rng"] = Part(capture_rng_state, load_rng, last=True)
    if info.enabled:
        parts["rng_per_rank"] = Part(lambda: distributed.all_gather_object(capture_rng_state()))
    parts["data"] = Part(lambda: {"seed": cfg.seed, "epoch": trainer.state.epoch,
                                  "batch_in_epoch": trainer.state.batch_in_epoch})
    optional = {"ema": run.ema, "early_stopping": run.early,
                "curriculum": run.curriculum if run.curriculum.enabled else None, "distill": trainer.distill}
    for name, component in optional.items():
        if component is not None:
            parts[name] = Part(component.state_dict, lambda v, s, c=component: c.load_state_dict(v), optional=True)
    stateful = run.callbacks.stateful()
    if stateful:
        parts["callbacks"] = Part(lambda: {name: c.state_dict() for name, c in stateful.items()},
                                  lambda v, s: _load_callbacks(stateful, v), optional=True)


def _load_callbacks(stateful: Dict[str, Any], saved: Any) -> None:
    saved = saved if isinstance(saved, dict) else {}
    for name, callback in stateful.items():
        if name in saved:
            callback.load_state_dict(saved[name])
        else:
            log.warning("resume: the checkpoint has no state of callback %s; it starts afresh", name)


def state_dict(run: Run) -> Dict[str, Any]:
    """What a checkpoint holds: every registered part's state, in registration order."""
    return {name: part.save() for name, part in run.parts.items()}


def restore(run: Run) -> None:
    """Load `run.resumed` into the built run: every registered part (check_state has vetted each already)."""
    state, meta = run.resumed.state, run.resumed.meta
    from trainrun import checkpoint_sharded

    if checkpoint_sharded.is_sharded(run.resumed.dir):  # the model and optimizer are in the shards, not in `state`
        checkpoint_sharded.restore(run)
        apply_hparams(run.optimizer, run.cfg.optimizer, run.global_batch, run.lr_scales)
    for name, part in sorted(run.parts.items(), key=lambda item: item[1].last):
        if part.load is None:
            continue
        if name in state:
            part.load(state[name], state)
        elif part.optional:
            log.warning("resume: the checkpoint has no %s state; %s starts afresh", name, name)
    trainer, info = run.trainer, run.info
    reshaped = horizon_change(run.cfg.schedule, state["schedule"], run.schedule, run.steps_per_epoch,
                              trainer.state.step, run.optimizer.param_groups[0]["base_lr"])
    if reshaped:
        log.warning(reshaped)
    saved_world = meta.get("world_size", 1)
    if saved_world != info.world:
        log.warning("resume on another world size (%d -> %d processes): the global batch becomes %d, each rank's "
                    "data shard and RNG stream change, so the trajectory will differ from the original run",
                    saved_world, info.world, run.global_batch)
        if info.is_main:
            print(f"warning: resume on another world size ({saved_world} -> {info.world}); the trajectory "
                  "changes from here", flush=True)
    if info.is_main:
        trim_metrics(run.dir, trainer.state.step)
