"""The training loop, readable top to bottom: `train_step`, `evaluate`, `fit`.

The loop knows the interfaces of the techniques (task, precision policy, schedule, callbacks), not their insides:
the task computes the loss and the sums its metrics come from; the loop never reads a target itself.
Step order: zero_grad -> forward under autocast -> fp32 loss / accumulation -> backward (scaled for
fp16) -> unscale -> clip -> optimizer step via the scaler -> scaler update -> schedule -> log.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from trainrun.data import BatchStream
from trainrun.diagnostics import measured_peak_bytes
from trainrun.distill import Distiller
from trainrun.distributed import all_reduce_sum
from trainrun.doctor import Doctor, TrainingHalted
from trainrun.precision import PrecisionPolicy, full_value
from trainrun.regularization import EMA, BatchAugment
from trainrun.schedule import Schedule
from trainrun.tasks import Task


@dataclass
class TrainState:
    """Everything about the loop's position; saved in every checkpoint."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples: int = 0
    best_metric: Optional[float] = None
    last_eval: Dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    stopped_early: bool = False

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: PrecisionPolicy
    loss_fn: nn.Module
    train: BatchStream
    val: BatchStream
    device: torch.device
    total_steps: int
    accumulation: int = 1
    clip_norm: Optional[float] = None
    clip_value: Optional[float] = None
    augment: Optional[BatchAugment] = None
    ema: Optional[EMA] = None
    distill: Optional[Distiller] = None
    world: int = 1  # processes; > 1 under torchrun (metrics are averaged over ranks at log steps)
    doctor: Optional[Doctor] = None  # the NaN/inf guard and statistics (trainrun.doctor)
    zero_grad: bool = True  # False only for the no_zero_grad teaching fault
    channels_last: bool = False  # 4-D inputs go to the model in NHWC memory format
    task: Optional[Task] = None  # the loss and the metrics' sums (trainrun.tasks); None: classification by loss_fn
    state: TrainState = field(default_factory=TrainState)
    params: List[torch.Tensor] = field(default_factory=list)  # trainable parameters, listed once
    before_step: Optional[Callable[[int], None]] = None  # called with the steps done before each step (unfreezing)
    grad_sync: Optional[Callable[[bool], None]] = None  # DDP/FSDP2's gradient all-reduce switch, found once

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_sync = _grad_sync_switch(self.model)
        if self.task is None:
            from trainrun.tasks.classification import Classification

            self.task = Classification(None, self.loss_fn, ())


def micro_batches(t: Trainer) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """An endless stream of (x, y, sample indices) that keeps `t.state` (epoch, batch_in_epoch) exact."""
    while True:
        for x, y, idx in t.train.iter_epoch(t.state.epoch, t.state.batch_in_epoch):
            t.state.batch_in_epoch += 1
            yield x, y, idx
        t.state.epoch += 1
        t.state.batch_in_epoch = 0


def train_step(t: Trainer, batches: Iterator, want_norm: bool, want_sums: bool = True) -> Dict[str, torch.Tensor]:
    """One optimizer step over `accumulation` micro-batches. Returns device tensors; the only host sync is the
    doctor's guard (one small tensor per step; with doctor.guard_sync=deferred the previous step's, read here after
    this step's forward/backward is queued). `want_sums`: compute the task's train sums (train/acc); `fit` asks for
    them on log steps only."""
    doc, state = t.doctor, t.state
    if t.zero_grad:
        t.optimizer.zero_grad(set_to_none=True)
    if doc is not None:
        if not doc.armed:
            doc.arm(t.optimizer, functools.partial(_rewound, state), t.ema is not None)
        doc.begin_step(state.step + 1)
    loss_sum = sums = None
    n = 0
    fetched, token_scale = _token_weighting(t, batches) if t.task.token_weighted else (None, None)
    for i in range(t.accumulation):
        if t.grad_sync is not None:
            t.grad_sync(i == t.accumulation - 1)  # all-reduce gradients on the last micro-batch only
        x, y, idx = next(batches) if fetched is None else fetched[i]
        if doc is not None:
            doc.check_labels(y, idx)
        x, y = _to_device(x, t.device, t.channels_last), _to_device(y, t.device, False)
        if doc is not None:
            doc.watch(x, y, idx)
        target = y
        if t.augment is not None:
            x, target = t.augment(x, y)  # MixUp/CutMix give probability targets; accuracy uses the hard labels
        with t.precision.autocast():
            logits = t.model(x)
        if token_scale is not None:  # this micro-batch's share of the step's mean over counted tokens
            loss = t.task.summed_loss(logits, target) * token_scale
            t.precision.backward(loss)
        else:
            if t.distill is not None:
                loss, _ = t.distill.loss(x, logits, target, t.loss_fn, t.precision.autocast)
            else:
                loss = t.task.loss(logits, target)  # the loss is always computed in fp32
            t.precision.backward(loss / t.accumulation if t.accumulation > 1 else loss)  # no extra autograd node
        if want_sums:
            batch_sums = t.task.train_sums(logits, y)
            sums = batch_sums if sums is None else {k: sums[k] + v for k, v in batch_sums.items()}
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        n += y.shape[0]
    if doc is not None and doc.pending is not None:
        doc.resolve()
    norm = t.precision.unscale_and_clip(t.optimizer, t.params, clip_norm=t.clip_norm,
                                        clip_value=t.clip_value, want_norm=want_norm)
    mean_loss = loss_sum / t.accumulation if t.accumulation > 1 and token_scale is None else loss_sum
    apply = doc.end_step(mean_loss, norm, (state.step, state.epoch, state.batch_in_epoch, state.samples),
                         t.params) if doc is not None else True
    if not apply:  # the guard skipped this step (nan_guard=skip): no update, the batch is consumed
        t.optimizer.zero_grad(set_to_none=True)
    t.precision.update(t.optimizer, apply)
    if doc is not None:
        doc.after_update()
    if t.ema is not None and apply:
        t.ema.update()
    t.state.step += 1
    t.state.samples += n
    t.schedule.apply(t.optimizer, t.state.step)
    # the guard may have read the loss to the host already: then fit sums it there (no device accumulator op)
    out = {"loss": mean_loss, "loss_value": doc.step_loss if doc is not None else None, "sums": sums, "n": n,
           "skipped": not apply}
    if norm is not None:
        out["grad_norm"] = norm
    return out


def _token_weighting(t: Trainer, batches: Iterator) -> Tuple[List, torch.Tensor]:
    """A token-weighted task (causal_lm): the step's micro-batches, fetched first, and the factor that turns a
    micro-batch's summed loss into its share of the mean over every counted token of the step, on all ranks:
    world / total tokens (DDP and FSDP2 average gradients over ranks, so each rank's share is scaled by world).
    The sum over micro-batches of (summed loss x factor) is then this rank's part of the global token mean."""
    fetched = [next(batches) for _ in range(t.accumulation)]
    total = sum(t.task.counted_tokens(y) for _, y, _ in fetched).to(t.device, torch.float64)
    if t.world > 1:
        total = all_reduce_sum(total)
    return fetched, (t.world / total.clamp(min=1)).float()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.ndim == 4:
        return x.to(device, memory_format=torch.channels_last, non_blocking=True)
    return x if x.device == device else x.to(device, non_blocking=True)


def _grad_sync_switch(model: nn.Module) -> Optional[Callable[[bool], None]]:
    """How to turn the gradient all-reduce on and off for the coming backward; None for a plain module. Found once:
    hasattr on a module that lacks the attribute raises and catches an AttributeError, twice per micro-batch."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        return functools.partial(setattr, model, "require_backward_grad_sync")
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return model.set_requires_gradient_sync
    return None


@contextlib.contextmanager
def _rewound(state: TrainState, position: Tuple[int, int, int, int]):
    """The trainer's position as it was before a step (a deferred guard's bad step is dumped from there)."""
    now = (state.step, state.epoch, state.batch_in_epoch, state.samples)
    state.step, state.epoch, state.batch_in_epoch, state.samples = position
    try:
        yield
    finally:
        state.step, state.epoch, state.batch_in_epoch, state.samples = now


EVAL_METRICS = ("val/loss", "val/acc")  # what classification's `evaluate` returns without task.metrics


def eval_metric_names(ema: bool, names: Tuple[str, ...] = EVAL_METRICS) -> Tuple[str, ...]:
    """Every metric name `evaluate_all` logs: the task's val/* `names`, plus val_raw/* (the raw weights) with EMA."""
    return tuple(names) + tuple(k.replace("val/", "val_raw/") for k in names if ema)


def evaluate_all(t: Trainer) -> Dict[str, float]:
    """val/* from the EMA weights when EMA is on (val_raw/* then holds the raw weights), else the raw weights.
    The val/* pass's accumulator stays in `t.task.last_evaluation` (confusion matrix, reliability bins)."""
    raw = measure(t.model, t.val, t.precision, t.device, t.channels_last, t.task)
    if t.ema is None:
        t.task.last_evaluation = raw
        return raw.compute()
    measured = measure(t.ema.module, t.val, t.precision, t.device, t.channels_last, t.task)
    t.task.last_evaluation = measured
    return {**measured.compute(), **{k.replace("val/", "val_raw/"): v for k, v in raw.compute().items()}}


def evaluate(model: nn.Module, stream: BatchStream, precision: PrecisionPolicy, device: torch.device,
             channels_last: bool = False, task: Optional[Task] = None) -> Dict[str, float]:
    """The task's val/* metrics over the whole stream."""
    return measure(model, stream, precision, device, channels_last, task).compute()


@torch.no_grad()
def measure(model: nn.Module, stream: BatchStream, precision: PrecisionPolicy, device: torch.device,
            channels_last: bool = False, task: Optional[Task] = None):
    """One pass over the stream into the task's evaluation accumulator (trainrun.metrics), updated batch by batch;
    each rank measures the whole stream, so no metric is synced across ranks."""
    if task is None:
        from trainrun.tasks.classification import Classification

        task = Classification(None, nn.CrossEntropyLoss(), ())
    was_training = model.training
    model.eval()
    evaluation = task.evaluation()
    for x, y, _ in stream.iter_epoch(0):
        x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with precision.autocast():
            output = model(x)
        evaluation.update(output, y)
    model.train(was_training)
    return evaluation


def fit(t: Trainer, *, log_every: int, eval_every: int, ckpt_every: int, stop_at: int,
        log: Callable[[int, Dict], None], on_eval: Callable[[Dict[str, float]], None],
        save: Callable[[], None], advance: Callable[[int], None], should_stop: Callable[[], bool],
        on_step: Optional[Callable[[int, Dict], None]] = None, eval_at_start: bool = False) -> None:
    """Train until `stop_at` (<= total_steps), evaluating, checkpointing and logging on their intervals.

    `should_stop()` (a signal arrived) checkpoints at the current step boundary and returns early. `on_step(step,
    out)` after every step (user callbacks; it costs a host sync per step, so it is None without them).
    """
    if eval_at_start and t.state.step == 0:  # the starting point (not a candidate for the best checkpoint)
        log(0, {"epoch": 0, **evaluate_all(t)})
    t.model.train()
    batches = micro_batches(t)
    window, norm = _Window(t.device), None
    while t.state.step < stop_at:
        if t.before_step is not None:
            t.before_step(t.state.step)
        is_log_step = (t.state.step + 1) % log_every == 0 or t.state.step + 1 == stop_at
        # the task's train metrics (train/acc) come from the log step's batch alone: measuring every step would
        # cost a few tensor ops per step for a number shown once per window (train/loss is the window's mean)
        out = train_step(t, batches, want_norm=is_log_step, want_sums=is_log_step)
        window.add(out)
        norm = out.get("grad_norm", norm)
        step = t.state.step
        if on_step is not None:
            _settle(t)
            on_step(step, out)
        if is_log_step:
            _settle(t)
            log(step, _train_metrics(t, window, out, norm, step))
            window.reset()
        else:
            advance(step)
        evaluated = step % eval_every == 0 or step == t.total_steps
        if evaluated:
            _settle(t)
            metrics = evaluate_all(t)
            t.state.last_eval = metrics
            on_eval(metrics)
            log(step, {"epoch": t.state.epoch, **metrics})
            window.start = time.perf_counter()  # keep eval time out of throughput
        # Under torchrun should_stop() is an all_reduce + host sync, so ranks agree on it at log and eval steps
        # only (a signal is honoured within logger.log_every steps; early stopping decides at an eval step);
        # one process checks its flag every step.
        stop = (t.world == 1 or is_log_step or evaluated) and should_stop()
        if step % ckpt_every == 0 or step == stop_at or stop:
            _settle(t)
            save()
            window.start = time.perf_counter()
            if stop:
                return


class _Window:
    """The log window's running sums: the loss (on the host where the guard already read it, else on the device:
    no accumulator op per step when it did), the samples and the applied steps, and when the window started."""

    def __init__(self, device: torch.device):
        self.device_loss, self.device_steps = torch.zeros((), device=device), 0
        self.reset()

    def reset(self) -> None:
        if self.device_steps:
            self.device_loss.zero_()
        self.host_loss, self.device_steps, self.seen, self.steps = 0.0, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, out: Dict) -> None:
        if out["skipped"]:
            return
        if out["loss_value"] is not None:
            self.host_loss += out["loss_value"]
        else:
            self.device_loss += out["loss"]
            self.device_steps += 1
        self.seen += out["n"]
        self.steps += 1

    def loss_sum(self) -> torch.Tensor:
        """Both parts in the device tensor (for the all-reduce under torchrun)."""
        self.device_loss += self.host_loss
        self.host_loss, self.device_steps = 0.0, self.device_steps + 1
        return self.device_loss

    def mean_loss(self) -> float:
        device = float(self.device_loss) if self.device_steps else 0.0  # a host sync once per log interval
        return (self.host_loss + device) / max(1, self.steps)


def _train_metrics(t: Trainer, window: _Window, out: Dict, norm: Optional[torch.Tensor], step: int) -> Dict:
    """The log step's train/* metrics: the window's mean loss and throughput, the task's metrics from this step's
    batch, LR, gradient norm, peak memory and loss scale; summed over ranks under torchrun."""
    sums, sums_n = ({}, 0) if out["skipped"] else (dict(out["sums"] or {}), out["n"])
    if t.world > 1:  # sums over ranks: the same numbers one process with the global batch logs
        window.seen, sums_n = _reduce_window(t, window.loss_sum(), sums, window.seen, sums_n)
    loss = window.mean_loss()
    if loss != loss or loss in (float("inf"), float("-inf")):  # only reachable with doctor.nan_guard=off
        raise TrainingHalted(f"non-finite training loss ({loss}) in the {window.steps} steps up to step {step}; "
                             "re-run with doctor.nan_guard=halt to find the step and the layer, lower "
                             "optimizer.lr, or use precision=bf16 instead of fp16")
    rate = window.seen / max(time.perf_counter() - window.start, 1e-9)
    metrics = {"epoch": t.state.epoch, "train/loss": loss, **(t.task.train_metrics(sums, sums_n) if sums else {}),
               **t.task.window_metrics(loss, rate), "lr": t.optimizer.param_groups[0]["lr"], "samples_per_s": rate}
    if norm is not None:
        metrics["grad_norm"] = float(full_value(norm))
    metrics["peak_mem_mb"] = round(measured_peak_bytes(t.device)["bytes"] / 1024 ** 2, 1)
    if t.precision.scaler.is_enabled():
        metrics["loss_scale"] = t.precision.scaler.get_scale()
    return metrics


def _settle(t: Trainer) -> None:
    """A deferred guard verdict is read before anything that syncs or persists: log, eval, callbacks, checkpoint."""
    if t.doctor is not None and t.doctor.pending is not None:
        t.doctor.resolve()


def _reduce_window(t: Trainer, loss_acc: torch.Tensor, sums: Dict[str, torch.Tensor], seen: int,
                   sums_n: int) -> Tuple[int, int]:
    """All-reduce the log window over ranks in one call: the mean loss, the task's sums (of the log step), the
    samples seen in the window and in the log step."""
    keys = list(sums)
    flat = torch.cat([loss_acc.double().reshape(1), *[sums[k].double().reshape(-1) for k in keys],
                      torch.tensor([float(seen), float(sums_n)], device=t.device, dtype=torch.float64)])
    totals = all_reduce_sum(flat)
    loss_acc.fill_(float(totals[0]) / t.world)
    at = 1
    for k in keys:
        size = sums[k].numel()
        sums[k] = totals[at:at + size].reshape(sums[k].shape).to(sums[k].dtype)
        at += size
    return int(totals[-2]), int(totals[-1])


def overfit_one_batch(t: Trainer, steps: int, target: float) -> Tuple[List[float], List[float], Optional[str]]:
    """Train on the first batch of epoch 0 again and again until its loss is below `target` or `steps` ran.
    Returns the loss and gradient norm of every step, and the doctor's halt message if it stopped the run."""
    t.model.train()
    batch = next(micro_batches(t))
    batches = itertools.repeat(batch)
    losses: List[float] = []
    norms: List[float] = []
    try:
        for _ in range(steps):
            out = train_step(t, batches, want_norm=True)
            _settle(t)
            loss, norm = torch.stack([out["loss"].float(), out["grad_norm"].float()]).tolist()
            losses.append(loss)
            norms.append(norm)
            if loss < target:
                break
    except TrainingHalted as e:
        return losses, norms, str(e)
    return losses, norms, None
