"""The training doctor: the per-step NaN/inf guard, gradient/activation statistics, and the overfit-one-batch verdict.

The loop calls four hooks per optimizer step: `begin_step` (after zero_grad), `watch` (each micro-batch),
`end_step` (after unscale/clip, before the optimizer step: decides apply / skip / halt) and `after_update`.
A healthy step costs one host sync (a 5-number tensor) and a finiteness pass over the inputs; the expensive work
(re-running a bad step with hooks to find the first non-finite layer, per-layer statistics) happens only on a bad
step or on a statistics step. Every finding is an observation of the run, never a reading of the fault preset.

doctor.guard_sync=deferred keeps that sync off the step's critical path: `end_step` leaves the verdict on the
device and lets the update happen (the weights and optimizer state copied first, one fused copy), and `resolve`
reads it one step later, after the next step's forward/backward is queued, or at the loop's next sync point (log,
eval, checkpoint, stop). A bad step is then undone (weights, optimizer state, BatchNorm statistics back to their
values before it) and diagnosed and dumped as the step path would: same step, layer, batch indices, trainer state.
"""
from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from trainrun.errors import ConfigError, TrainrunError
from trainrun.precision import full_value, total_norm

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14  # below this fp16 is subnormal (precision lost), below 2**-24 it flushes to zero


class TrainingHalted(TrainrunError):
    """The doctor stopped the run: a bad step under nan_guard=halt, or a failed overfit test (exit code 1)."""
    exit_code = 1


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP wraps; FSDP2 shards in place


def _leaves(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n or type(m).__name__, m) for n, m in model.named_modules() if next(m.children(), None) is None]


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def locate_nonfinite(model: nn.Module, batches: List[Tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                     autocast) -> Dict:
    """Re-run a step's micro-batches with hooks; the model's buffers (BatchNorm statistics), its .grad fields and
    the RNG streams are left as they were. Returns the first module in forward order whose output is non-finite;
    else the first module in backward order whose backward turned a finite output gradient into a non-finite input
    or parameter gradient (or the loss, when the gradient at the model's output is already non-finite); and the
    parameters with non-finite gradients; plus each layer's output std and max |value| up to the first non-finite
    output (for the overflow and init hints)."""
    net = unwrap(model)
    found = {"forward_layer": None, "backward_layer": None, "param_grads": [], "act": []}
    handles, out_bad, culprits, owners = [], {}, [], {}

    def hook(name, mod):
        def fn(m, inp, out):
            o = _first_tensor(out)
            if o is None or not o.is_floating_point():
                return
            d = o.detach().float()
            finite = bool(torch.isfinite(d).all())
            if found["forward_layer"] is None:
                if finite:
                    found["act"].append({"layer": name, "type": type(mod).__name__,
                                         "std": float(d.std()) if d.numel() > 1 else 0.0,
                                         "absmax": float(d.abs().max()) if d.numel() else 0.0})
                else:
                    found["forward_layer"] = f"{name} ({type(mod).__name__})"
            label = f"{name} ({type(mod).__name__})"
            if o.requires_grad:  # backward reaches a module's output before its input
                def on_output_grad(g, label=label):
                    out_bad.setdefault(label, not bool(torch.isfinite(g).all()))
                o.register_hook(on_output_grad)
            i = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            if i is not None and i.requires_grad and i is not o:
                def on_input_grad(g, label=label):
                    # finite gradient at the module's output, non-finite at its input: its backward made it
                    if not bool(torch.isfinite(g).all()) and out_bad.get(label) is False:
                        culprits.append(label)
                i.register_hook(on_input_grad)
        return fn

    for name, m in _leaves(net):
        handles.append(m.register_forward_hook(hook(name, m)))
        owners.update({f"{name}.{pn}": f"{name} ({type(m).__name__})" for pn, _ in m.named_parameters(recurse=False)})
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
            for x, y in batches:
                with autocast():
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                if found["forward_layer"] is not None:
                    break
                if not loss.requires_grad:
                    continue
                grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                found["param_grads"] = [n for (n, _), g in zip(params, grads) if g is not None and not bool(
                    torch.isfinite(g.coalesce().values() if g.is_sparse else g).all())]  # sparse: nn.Embedding(sparse)
                # a module whose own parameter gradient is non-finite although its output gradient is finite
                culprits += [owners[n] for n in found["param_grads"] if out_bad.get(owners.get(n)) is False]
                if culprits:
                    found["backward_layer"] = culprits[0]
                elif any(out_bad.values()):
                    found["backward_layer"] = "the loss (its gradient at the model's output is non-finite)"
                if found["backward_layer"] or found["param_grads"]:
                    break
                out_bad.clear()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])
    return found


class Doctor:
    def __init__(self, cfg, model: nn.Module, precision, loss_fn: nn.Module, num_classes: int, *,
                 world: int = 1, reduce_sum: Optional[Callable] = None, save_badstep: Optional[Callable] = None,
                 log: Optional[Callable] = None, say: Callable = print, stats_path: Optional[Path] = None,
                 lr: Callable[[], float] = lambda: float("nan"), probe_data: Optional[Tuple] = None,
                 badsteps_path: Optional[Path] = None, initial_loss: Optional[float] = None):
        """`num_classes` None: the task does not classify into classes 0..C-1 (binary, multilabel, regression), so
        the label-range, chance-level and label-probe checks do not apply. `initial_loss`: the mean loss the task
        expects from a model with zero outputs (classification: ln C), for the first-step loss check."""
        self.cfg, self.model, self.net = cfg, model, unwrap(model)
        self.initial_loss = initial_loss if initial_loss is not None or num_classes is None else math.log(num_classes)
        self.precision, self.loss_fn, self.num_classes = precision, loss_fn, num_classes
        self.world, self.reduce_sum = world, reduce_sum
        self.save_badstep, self.log, self.say, self.lr = save_badstep, log, say, lr
        self.stats_path, self.probe_data, self.badsteps_path = stats_path, probe_data, badsteps_path
        self.guard = cfg.nan_guard != "off"
        self.history: deque = deque(maxlen=200)  # (step, loss, grad_norm) of recent healthy steps
        self.findings: Dict[str, str] = {}  # code -> message, each said once
        self.skipped: List[int] = []
        self.skips_in_row = self.badsteps_written = 0
        self.overflow_skips = 0  # fp16: steps the GradScaler skipped (inf/NaN gradients)
        self.first_loss: Optional[float] = None
        self._chance_checked = False  # the val-at-chance probe runs once
        self.batch_size: Optional[int] = None
        self.underflow: Optional[Dict] = None  # last fp16 gradient-underflow measurement
        self._step = 0
        self._batches: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._hooks: List = []
        self._acts: Dict[str, Dict] = {}
        self._grad_probe: Dict[str, float] = {}
        self._weights_before: Optional[List[torch.Tensor]] = None
        self._stats_row: Optional[Dict] = None
        self.probe_every = cfg.stats_every
        self._inject = None
        self._first_param = next((p for p in self.net.parameters() if p.requires_grad), None)
        self.deferred = self.armed = False  # set by `arm` (the loop knows the optimizer, the EMA, the position)
        self.pending: Optional[Dict] = None  # the step whose verdict is still on the device
        self._lr_at_step: Optional[float] = None  # a deferred bad step's LR, for its report
        self._snap: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = []
        self._had_state: Dict = {}
        self._optimizer = self._rewind = None
        self._snap_count = -1
        self.step_loss: Optional[float] = None  # the step's loss, read to the host by the guard (step mode, CPU)
        self._on_host: Optional[bool] = None  # step mode, one CPU process, no scaler: `_read_on_host`
        self._found_inf = None  # the fused finite check's flag (see _grads_finite); False: not usable
        self._one: Optional[torch.Tensor] = None
        # A bad step's forward has already moved BatchNorm's running statistics (NaN in, NaN out): the buffers
        # are copied at every step start (one fused copy) and put back on a bad step, so a skipped step leaves no
        # trace and the .badstep checkpoint holds the true state before the step.
        self._buffers = [b for b in self.net.buffers()] if self.guard else []
        self._buffer_copy = [b.detach().clone() for b in self._buffers]
        self._buffer_prev: List[torch.Tensor] = []  # deferred: the statistics before the pending step
        # in-memory datasets had their labels validated at load: no per-step label check for them
        self._labels_validated = probe_data is not None and hasattr(probe_data[0], "x")
        self._check_host_labels = self.guard and not self._labels_validated and num_classes is not None
        if cfg.inject_nan_step:
            modules = dict(self.net.named_modules())
            if cfg.inject_nan_layer not in modules:
                names = [n for n, _ in _leaves(self.net)]
                raise TrainrunError(f"doctor.inject_nan_layer={cfg.inject_nan_layer!r} is not a module of this "
                                    f"model; choose one of {', '.join(names[:30])}")
            self._inject = modules[cfg.inject_nan_layer]

    # -- per step ---------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """`step` is the 1-based optimizer step about to run; called right after the loop's zero_grad."""
        self._step = step
        self._batches = []
        self.step_loss = None
        if self._buffers:
            if self.pending is not None:  # keep the statistics from before the pending step
                if not self._buffer_prev:
                    self._buffer_prev = [b.clone() for b in self._buffer_copy]
                self._buffer_copy, self._buffer_prev = self._buffer_prev, self._buffer_copy
            torch._foreach_copy_(self._buffer_copy, self._buffers)
        # zero_grad(set_to_none=True) clears every .grad at once, so the first trainable parameter tells
        if step > 1 and self._first_param is not None and self._first_param.grad is not None:
            carried = [n for n, p in self.net.named_parameters() if p.grad is not None]
            self._halt_now("gradients_carried_over",
                           f"gradients from the previous step were still in .grad when step {step} began "
                           f"({len(carried)} tensors, e.g. {carried[0]}): they are never cleared, so every update "
                           "applies the sum of all past gradients. Call optimizer.zero_grad() (set_to_none=True) "
                           "once per optimizer step, before the first backward")
        if self._inject is not None and step == self.cfg.inject_nan_step:
            self._hooks.append(self._inject.register_forward_hook(lambda m, i, o: o * float("nan")))
        if self.probe_every and self.is_probe_step(step):
            self._install_probes()

    def is_probe_step(self, step: int) -> bool:
        return self.probe_every > 0 and (step % self.probe_every == 0 or step == 1)

    def check_labels(self, y: torch.Tensor, idx: torch.Tensor) -> None:
        """Labels still on the host are checked before anything uses them: cross-entropy on an out-of-range label
        raises (CPU) or kills the process with a device assert (CUDA). Labels already on the GPU are those of
        in-memory datasets, validated when they were loaded."""
        if not self._check_host_labels or y.is_floating_point() or y.device.type != "cpu" or not len(y):
            return
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= self.num_classes:
            self.resolve()  # a pending step's verdict comes first
            self._batches.append((y.new_zeros(()), y, idx))
            self._bad_step(f"labels outside [0, {self.num_classes})", float("nan"), float("nan"), float("nan"))

    def watch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """One micro-batch about to be used. Non-finite inputs always make the loss non-finite, so they are looked
        for only on a bad step (no per-step cost)."""
        self._batches.append((x, y, idx))
        if self.batch_size is None:
            self.batch_size = len(y)

    def end_step(self, loss: torch.Tensor, norm: Optional[torch.Tensor], position: Optional[Tuple] = None,
                 params: Sequence[torch.Tensor] = ()) -> bool:
        """Gradients are unscaled (and clipped), the optimizer has not stepped. Returns whether to apply the update;
        raises TrainingHalted under nan_guard=halt. The one host sync of a healthy step happens here (deferred:
        in `resolve`, one step later). `norm`: the global gradient norm where the loop computed one (log steps,
        clipping); otherwise one CPU process checks the gradients by a fused inf/NaN test (`_read_on_host`), and
        elsewhere the per-tensor norms of `params`' gradients travel with the loss in one tensor and the global norm
        is summed on the host. `position`: the trainer's (step, epoch, batch_in_epoch, samples) now,
        where a deferred bad step's .badstep dump is taken from."""
        if self._stats_row is None and self.probe_every and self.is_probe_step(self._step):
            if norm is None:
                norm = total_norm([p.grad for p in params if p.grad is not None])
            self._collect_grad_stats(norm)
        if not self.guard:
            self._clear_hooks()
            return True
        if self._on_host is None:  # decided once per run (arm() resets it)
            self._on_host = not self.deferred and self.precision.scale_tensor() is None and self.world == 1 \
                and loss.device.type == "cpu"
        if self._on_host:
            return self._judge(*self._read_on_host(loss, norm, params), False)
        loss = loss.detach() if loss.requires_grad else loss
        scale = self.precision.scale_tensor()
        parts = [loss.float()]
        if norm is not None:
            parts.append(full_value(norm).float())
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and type(grads[0]) is torch.Tensor and grads[0].device == parts[0].device:  # not DTensors
                parts.extend(torch._foreach_norm(grads, 2, dtype=torch.float32))
            elif grads:
                norm = total_norm(grads)
                parts.append(full_value(norm).float())
        norms = len(parts) - 1
        if scale is not None:
            parts.append(scale.float().reshape(()))
        vals = torch.stack(parts)
        if self.world > 1 and self.reduce_sum is not None:  # every rank must take the same decision
            bad = self.reduce_sum((~torch.isfinite(vals[:1])).float())
            vals = torch.cat([torch.where(bad > 0, torch.full_like(bad, float("nan")), vals[:1]), vals[1:]])
        if self.deferred and self._stats_row is None:
            self._defer(vals, norms, position)
            return True
        return self._judge(_host_values(vals.tolist(), norms), norms > 0, scale is not None)

    def _read_on_host(self, loss: torch.Tensor, norm: Optional[torch.Tensor],
                      params: Sequence[torch.Tensor]) -> Tuple[List[float], bool]:
        """One CPU process, no scaler: the step's loss and gradient verdict with the fewest ops. Without a norm from
        the loop, the gradients are checked for inf/NaN by one fused op (GradScaler's own check, unscaling by
        exactly 1) instead of a norm per tensor; the norm is then computed only on a bad step, for its report.
        Returns ([loss, (global norm)], whether the norm is there), as `_judge` takes them."""
        loss_v = self.step_loss = loss.item()  # two .item() reads cost less on the CPU than stacking them first
        if norm is not None:
            return [loss_v, full_value(norm).item()], True
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not self._grads_finite(grads):
            return [loss_v, _host_norm(grads)], True
        return [loss_v], False

    def _grads_finite(self, grads: List[torch.Tensor]) -> bool:
        if self._found_inf is None:
            g = grads[0]
            fused = all(type(t) is torch.Tensor and t.layout == torch.strided and t.device == g.device
                        and t.is_floating_point() for t in grads)
            self._found_inf = torch.zeros((), device=g.device) if fused else False
            self._one = torch.ones((), device=g.device)
        if self._found_inf is False:  # DTensors, sparse or spread over devices: the plain norm
            return math.isfinite(_host_norm(grads))
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._one)
        if self._found_inf.item() == 0:  # set to 1 by a non-finite value, never reset by the op itself
            return True
        self._found_inf.zero_()
        return False

    def _judge(self, got: List[float], has_norm: bool, scaler_on: bool) -> bool:
        """The verdict on the step's loss, gradient norm and loss scale (host numbers)."""
        loss_v = got[0]
        norm_v = got[1] if has_norm else float("nan")
        scale_v = got[-1] if scaler_on else float("nan")
        problem = None
        if not math.isfinite(loss_v):
            problem = f"non-finite loss ({loss_v})"
        elif has_norm and not math.isfinite(norm_v):
            if scaler_on:  # fp16 overflow: GradScaler skips this step and halves the scale; that is its job
                self.overflow_skips += 1
            else:
                problem = f"non-finite gradient norm ({norm_v})"
        if problem is None and scaler_on and scale_v < self.cfg.min_loss_scale:
            problem = "fp16 loss-scale collapse"
        if problem is not None:
            return self._bad_step(problem, loss_v, norm_v, scale_v)
        self.skips_in_row = 0
        if self.first_loss is None:
            self.first_loss = loss_v
            if self._step == 1:
                self._check_initial_loss(loss_v)
        self.history.append((self._step, loss_v, norm_v))
        return True

    # -- the deferred verdict (doctor.guard_sync) -----------------------------------------------------------------
    def arm(self, optimizer: torch.optim.Optimizer, rewind: Callable, ema: bool) -> None:
        """Called once by the loop. `rewind(position)`: a context manager that puts the trainer's position back to
        what `begin_step` was given, for the .badstep dump of a step found bad one step late."""
        self._optimizer, self._rewind, self.armed = optimizer, rewind, True
        self.deferred = self.guard and guard_sync_mode(self.cfg, self.precision, ema) == "deferred"
        self._on_host = None

    def _defer(self, vals: torch.Tensor, norms: int, position: Optional[Tuple]) -> None:
        """Keep the verdict on the device; copy the weights and optimizer state the update is about to change."""
        if len(self._optimizer.state) != self._snap_count:
            self._snapshot_pairs()
        for live, copy in self._snap:
            torch._foreach_copy_(copy, live)
        self.pending = {"step": self._step, "vals": vals, "norms": norms, "batches": self._batches,
                        "position": position, "buffers": self._buffer_copy, "lr": self.lr(),
                        "lrs": [g["lr"] for g in self._optimizer.param_groups]}

    def _snapshot_pairs(self) -> None:
        """The tensors an update changes, grouped by (device, dtype) for fused copies: the parameters and the
        optimizer state (updated in place by every torch.optim optimizer). Rebuilt when the state gains entries."""
        opt = self._optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        self._had_state = {p: list(opt.state[p]) for p in params if p in opt.state}
        tensors = params + [v for p in self._had_state for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
        groups: Dict[Tuple, List[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self._snap = [(ts, [t.detach().clone() for t in ts]) for ts in groups.values()]
        self._snap_count = len(opt.state)

    def resolve(self) -> bool:
        """Read the pending step's verdict (the deferred guard's one host sync). A bad step is undone (weights,
        optimizer state and BatchNorm statistics as before it), then diagnosed and dumped at the trainer position
        before it, exactly as the step path would have. Returns whether a step was pending."""
        pend, self.pending = self.pending, None
        if pend is None:
            return False
        now = (self._step, self._batches, self._buffer_copy)
        self._step, self._batches = pend["step"], pend["batches"]
        try:
            got = _host_values(pend["vals"].tolist(), pend["norms"])
            has_norm = pend["norms"] > 0
            if math.isfinite(got[0]) and (not has_norm or math.isfinite(got[1])):
                return self._judge(got, has_norm, False)
            self._undo_update()
            for g, lr in zip(self._optimizer.param_groups, pend["lrs"]):  # the schedule has moved on since
                g["lr"] = lr
            self._buffer_copy = pend["buffers"]
            if self._inject is not None and pend["step"] == self.cfg.inject_nan_step:  # the re-run must see it too
                self._hooks.append(self._inject.register_forward_hook(lambda m, i, o: o * float("nan")))
            with self._rewind(pend["position"]):
                self._lr_at_step = pend["lr"]
                return self._judge(got, has_norm, False)
        finally:
            self._lr_at_step = None
            self._step, self._batches, self._buffer_copy = now

    def _undo_update(self) -> None:
        """Put back the weights and optimizer state copied before the pending update; state the update created
        (a parameter's first step) is removed, as if the optimizer had never stepped."""
        opt = self._optimizer
        with torch.no_grad():
            for live, copy in self._snap:
                torch._foreach_copy_(live, copy)
        for p in [p for p in opt.state if p not in self._had_state]:
            del opt.state[p]
        self._snap_count = -1

    def after_update(self) -> None:
        """After the optimizer step: update-to-weight ratios and the statistics row of a probe step."""
        if self._hooks:
            self._clear_hooks()
        if self._stats_row is None:
            return
        row, self._stats_row = self._stats_row, None
        if self._weights_before is not None:
            params = [p for _, p in self._named_params()]
            deltas = torch._foreach_sub([p.detach().float() for p in params], self._weights_before)
            dn = torch.stack(torch._foreach_norm(deltas)).tolist()
            wn = torch.stack(torch._foreach_norm(self._weights_before)).tolist()
            for layer in row["layers"]:
                idx = layer.pop("_params")
                d = math.sqrt(sum(dn[i] ** 2 for i in idx))
                w = math.sqrt(sum(wn[i] ** 2 for i in idx))
                layer["update_ratio"] = d / w if w > 0 else float("nan")
            self._weights_before = None
        self._judge_stats(row)
        self._write_stats(row)

    def _judge_stats(self, row: Dict) -> None:
        """Findings from a statistics row: an update larger than the weights, a network of dead ReLUs."""
        ratios = [(r["update_ratio"], r["layer"]) for r in row["layers"]
                  if math.isfinite(r.get("update_ratio", float("nan")))]
        if ratios:
            worst, layer = max(ratios)
            if worst > 1.0:
                self.note("lr_too_high", f"learning rate too high: the step {row['step']} update moved the weights of layer {layer!r} "
                                         f"by {worst:.3g}x their norm (healthy updates are ~1e-3 of it); "
                                         f"lower optimizer.lr (now {self.lr():.3g}) by 10-100x or run mode=lr_find")
        dead = [a["dead_frac"] for a in row["activations"].values() if "dead_frac" in a]
        if dead and min(dead) > 0.9:
            self.note("dead_relu", f"at step {row['step']} over 90% of the units of every ReLU layer output zero for "
                                   "the whole batch (dead ReLUs): no gradient flows through them; usually a too-large "
                                   "update killed them (see the learning rate), otherwise a bad init or bias")

    # -- the bad step -----------------------------------------------------------------------------------------
    def _bad_step(self, problem: str, loss_v: float, norm_v: float, scale_v: float) -> bool:
        step = self._step
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._buffer_copy)
        if problem.startswith("non-finite") and any(x.is_floating_point() and not bool(torch.isfinite(x).all())
                                                    for x, _, _ in self._batches):
            problem = "non-finite values in the input batch"
        lr = self._lr_at_step if self._lr_at_step is not None else self.lr()
        report = {"step": step, "problem": problem, "loss": loss_v, "grad_norm": norm_v, "lr": lr,
                  "precision": self.precision.name,
                  "batch_indices": [idx.tolist() for _, _, idx in self._batches]}
        if problem.startswith("non-finite values in the input"):
            report["bad_samples"] = sorted({int(i) for x, _, idx in self._batches
                                            for i, ok in zip(idx.tolist(), torch.isfinite(x.flatten(1)).all(1).tolist())
                                            if not ok})
        elif problem.startswith("labels outside"):
            report["bad_labels"] = sorted({(int(i), int(v)) for _, y, idx in self._batches
                                           for i, v in zip(idx.tolist(), y.tolist())
                                           if not 0 <= v < self.num_classes})[:20]
        elif problem == "fp16 loss-scale collapse":
            report["loss_scale"] = scale_v
            report["overflow_skips"] = self.overflow_skips
        else:
            where = locate_nonfinite(self.model, [(x, y) for x, y, _ in self._batches], self.loss_fn,
                                     self.precision.autocast) if self.world == 1 or hasattr(self.model, "module") \
                else {"forward_layer": None, "backward_layer": None, "param_grads": [], "act": []}
            report.update(first_nonfinite_output=where["forward_layer"],
                          first_nonfinite_grad=where["backward_layer"],
                          nonfinite_param_grads=where["param_grads"][:10], activations=where["act"])
        self._clear_hooks()
        report["hints"] = self.triage_hints(report)
        path = None
        if self.save_badstep is not None and self.badsteps_written < self.cfg.badstep_checkpoints:
            path = self.save_badstep(report)
            self.badsteps_written += 1
        report["badstep_checkpoint"] = str(path) if path else None
        self._say_bad_step(report)
        if self.badsteps_path is not None:
            with open(self.badsteps_path, "a") as f:
                f.write(json.dumps({k: v for k, v in report.items() if k != "activations"}) + "\n")
        where = report.get("first_nonfinite_output") or report.get("first_nonfinite_grad")
        head = f"{problem} at step {step}" + (f"; first non-finite layer: {where}" if where else "")
        if problem == "fp16 loss-scale collapse" or problem.startswith("labels") or self.cfg.nan_guard == "halt":
            raise TrainingHalted(f"{head}; {report['hints'][0]}" + (f"; bad-step checkpoint: {path}" if path else ""))
        self.skipped.append(step)
        self.skips_in_row += 1
        if self.skips_in_row >= self.cfg.max_consecutive_skips:
            raise TrainingHalted(f"{head}; {self.skips_in_row} bad steps in a row were skipped "
                                 f"(doctor.max_consecutive_skips): the run cannot recover; {report['hints'][0]}")
        return False

    def triage_hints(self, r: Dict) -> List[str]:
        """What to try, most likely first, from what the step showed (SEED_NOTES' triage order)."""
        p, hints = r["problem"], []
        if p.startswith("non-finite values in the input"):
            return [f"the data has NaN/inf in training samples {r['bad_samples'][:10]}: clean or drop them "
                    "(trainrun refuses NaN in in-memory data at load; this came from the file loader or augmentation)"]
        if p.startswith("labels outside"):
            pairs = ", ".join(f"sample {i}: {v}" for i, v in r["bad_labels"][:5])
            return [f"labels must be class indices in [0, {self.num_classes}) ({pairs}): fix the label map, or "
                    "set data.num_classes"]
        if p == "fp16 loss-scale collapse":
            return [f"fp16 loss scale collapsed to {r['loss_scale']:.3g} after {r['overflow_skips']} overflowing "
                    "steps: the gradients overflow fp16 even unscaled, so GradScaler skips every update and the "
                    "model stops learning; use precision=bf16 (fp32's exponent range, no loss scaling needed), or "
                    "lower optimizer.lr / clip gradients (regularization.clip_grad_norm=1.0)"]
        recent = [h for h in self.history if math.isfinite(h[2])]
        growth = recent[-1][2] / max(recent[0][2], 1e-12) if len(recent) >= 2 else None
        acts = r.get("activations") or []
        amax = max((a["absmax"] for a in acts if math.isfinite(a["absmax"])), default=0.0)
        if self.precision.name == "fp16" and amax > FP16_MAX / 2:
            layer = max(acts, key=lambda a: a["absmax"] if math.isfinite(a["absmax"]) else -1)["layer"]
            hints.append(f"fp16 overflow in the forward pass: activations reach {amax:.3g} at {layer} (fp16's "
                         f"largest value is {FP16_MAX:.0f}); loss scaling cannot help with this: use precision=bf16")
        lr = r["lr"]
        if growth is not None and growth > 10:
            hints.append(f"learning rate too high: the gradient norm grew {growth:.3g}x over the last {len(recent)} "
                         f"steps ({recent[0][2]:.3g} -> {recent[-1][2]:.3g}) before the loss went non-finite; lower "
                         f"optimizer.lr (now {lr:.3g}) by 10x, add warmup, or run mode=lr_find")
        elif r.get("first_nonfinite_output") and not hints:
            hints.append(f"the forward pass produced the first non-finite value in {r['first_nonfinite_output']} "
                         "with finite inputs: look for a numerical bug there (0/0, log(0), sqrt of a negative, "
                         f"exp overflow) or weights already blown up by a too-large learning rate (lr {lr:.3g})")
        else:
            hints.append(f"lower optimizer.lr (now {lr:.3g}) by 10x or run mode=lr_find; clip gradients with "
                         "regularization.clip_grad_norm=1.0")
        if self.precision.name == "fp16" and not hints[0].startswith("fp16 overflow"):
            scale = self.precision.scale_tensor()
            hints.append("fp16: " + (f"the loss scale is {float(scale):.3g}; " if scale is not None else
                                     "no loss scaling is on; ") + "retry with precision=bf16 to tell fp16 range "
                         "problems from real divergence")
        if len(acts) >= 4:
            first = next((a["std"] for a in acts if a["std"] > 0), 0.0)
            last = acts[-1]["std"]
            if first > 0 and (last / first > 100 or last / first < 0.01):
                hints.append(f"init: activation std goes {first:.3g} -> {last:.3g} from the first to the last "
                             "layer; use an init that preserves variance (init=kaiming_normal for ReLU, lsuv) or "
                             "add normalisation")
        hints.append("for the backward op that made the NaN, re-run with doctor.detect_anomaly=true (slow)")
        return hints

    def _say_bad_step(self, r: Dict) -> None:
        lines = [f"[bold red]doctor:[/] {r['problem']} at step {r['step']} (lr {r['lr']:.3g}, loss {r['loss']:.4g}, "
                 f"grad norm {r['grad_norm']:.4g}, precision {r['precision']})"]
        if r.get("first_nonfinite_output"):
            lines.append(f"  first non-finite output: {r['first_nonfinite_output']}")
        elif r.get("first_nonfinite_grad"):
            lines.append(f"  first non-finite gradient (backward order): {r['first_nonfinite_grad']}")
        if r.get("nonfinite_param_grads"):
            lines.append(f"  parameters with non-finite gradients: {', '.join(r['nonfinite_param_grads'][:5])}")
        lines.append(f"  batch sample indices: {r['batch_indices'][0][:16]}{' ...' if len(r['batch_indices'][0]) > 16 else ''}")
        if r.get("badstep_checkpoint"):
            lines.append(f"  bad-step checkpoint (state before the update, SHA256-checked): {r['badstep_checkpoint']}")
        lines += [f"  hint: {h}" for h in r["hints"]]
        if self.cfg.nan_guard == "skip":
            lines.append("  doctor.nan_guard=skip: the update was skipped and training goes on")
        self.say("\n".join(lines))

    def _halt_now(self, code: str, message: str) -> None:
        self.findings[code] = message
        self._clear_hooks()
        self.say(f"[bold red]doctor:[/] {message}")
        raise TrainingHalted(message)

    # -- findings outside a bad step ----------------------------------------------------------------------------
    def note(self, code: str, message: str) -> None:
        if code not in self.findings:
            self.findings[code] = message
            self.say(f"[yellow]doctor:[/] {message}")

    def _check_initial_loss(self, loss: float) -> None:
        """At the first step a classifier's mean cross-entropy is about ln(C) (a sigmoid task's BCE ln 2); B times
        that means a summed loss. Tasks with no expected first loss (regression) skip the check."""
        if not self.initial_loss:
            return
        expected, b = self.initial_loss, self.batch_size or 1
        what = f"ln({self.num_classes})" if self.num_classes else f"{expected:.3g}"
        ratio = loss / expected
        if b >= 8 and b / 2 <= ratio <= 2 * b:
            self.note("reduction_sum", f"the first loss is {loss:.4g} = {ratio:.1f} x {what} "
                                       f"with batch {b}: the loss is summed over the batch, not averaged "
                                       "(reduction='sum'), so the gradient and the effective LR grow with the "
                                       "batch size; use the mean (reduction='mean') or divide the LR by the batch")
        elif ratio > 3:
            self.note("initial_loss_high", f"the first loss is {loss:.4g}, {ratio:.1f} x {what} "
                                           "expected from a uniform prediction: the initial logits are large; "
                                           "shrink the output layer's init (init.zero_init_head=true)")

    def on_eval(self, step: int, val_acc: Optional[float]) -> None:
        """Validation at chance level: tell a label problem from a training problem with a model-free probe."""
        if self.num_classes is None:
            return  # chance level and the 1-NN label probe are multiclass notions
        chance = 1.0 / self.num_classes
        if val_acc is None or val_acc > 1.5 * chance or self._chance_checked:
            return
        self._chance_checked = True
        at = f"at step {step} val/acc is {100 * val_acc:.1f}%, chance level; "
        probe = self.check_label_probe(at)
        if probe is None or probe.n < LabelProbe.MIN_VAL:
            self.note("not_learning", f"{at}run mode=overfit_batch; if it passes, check that the labels go with the "
                                      "inputs" + (f" ({probe.describe()}: too few val samples to tell)" if probe else ""))
        elif not probe.at_chance:
            self.note("not_learning", f"{at}but the data is learnable: {probe.describe()}, above what random labels "
                                      f"give ({probe.p_text()}), so the labels depend on the inputs and the training "
                                      "does not work; run mode=overfit_batch to find out why (learning rate, loss, "
                                      "gradients)")

    def check_label_probe(self, prefix: str = "") -> Optional["LabelProbe"]:
        """Run the 1-NN probe; note `labels_unrelated` only when it is at chance on enough val samples."""
        probe = self.label_probe()
        if probe is not None and probe.n >= LabelProbe.MIN_VAL and probe.at_chance:
            self.note("labels_unrelated", f"{prefix}evidence that the training labels do not go with the inputs: "
                                          f"{probe.describe()}, no better than random labels ({probe.p_text()}); "
                                          "look for shuffled or misaligned labels, a wrong label map, or val "
                                          "preprocessed unlike train (the probe measures raw-input distances, so a "
                                          "label that depends on the inputs in a way they do not show can also "
                                          "look like this)")
        return probe

    def label_probe(self) -> Optional["LabelProbe"]:
        """Val accuracy of a 1-nearest-neighbour classifier on the raw inputs (in-memory data; up to 5,000 training
        and 1,000 val samples): well above chance for a real dataset whose training labels go with its inputs
        (digits: 98%), at chance, with little spread, when they do not. None if the data is not in memory."""
        if self.probe_data is None or self.num_classes is None:
            return None
        train, val = self.probe_data
        if not all(hasattr(d, "x") and hasattr(d, "y") for d in (train, val)) or len(val.y) == 0:
            return None
        g = torch.Generator().manual_seed(0)
        ti = torch.randperm(len(train.y), generator=g)[:5000]
        vi = torch.randperm(len(val.y), generator=g)[:1000]
        tx, ty = train.x[ti].flatten(1).float().cpu(), train.y[ti].cpu()
        vx, vy = val.x[vi].flatten(1).float().cpu(), val.y[vi].cpu()
        nearest = torch.cat([torch.cdist(chunk, tx).argmin(1) for chunk in vx.split(250)])
        k = int(max(ty.max(), vy.max())) + 1
        # with labels independent of the inputs, the neighbour's label matches with probability sum_k q_k r_k
        chance = float((torch.bincount(ty, minlength=k).double() / len(ty)
                        * torch.bincount(vy, minlength=k).double() / len(vy)).sum())
        return LabelProbe(float((ty[nearest] == vy).float().mean()), len(vy), chance)

    # -- statistics ---------------------------------------------------------------------------------------------
    def _named_params(self) -> List[Tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def _install_probes(self) -> None:
        self._acts = {}
        self._grad_probe = {"fp16_total": 0, "fp16_zero": 0, "fp16_subnormal": 0}
        calls: Dict[str, int] = {}

        def hook(name, mod):
            def fn(m, inp, out):
                o = _first_tensor(out)
                if o is None or not o.is_floating_point():
                    return
                calls[name] = calls.get(name, 0) + 1
                key = name if calls[name] == 1 else f"{name}#{calls[name]}"
                d = o.detach()
                row = {"act_mean": d.float().mean(), "act_std": d.float().std() if d.numel() > 1 else d.new_zeros(())}
                if isinstance(m, (nn.ReLU, nn.ReLU6)) and d.ndim >= 2:
                    # a unit (feature/channel) is dead on this batch if it is zero for every sample and position
                    alive = (d != 0).transpose(0, 1).reshape(d.shape[1], -1).any(1)
                    row["dead_frac"] = 1.0 - alive.float().mean()
                self._acts[key] = row
                if o.requires_grad and o.dtype == torch.float16:
                    def on_grad(g):
                        a = g.detach().abs()
                        self._grad_probe["fp16_total"] += a.numel()
                        self._grad_probe["fp16_zero"] += (a == 0).sum()
                        self._grad_probe["fp16_subnormal"] += ((a > 0) & (a < FP16_MIN_NORMAL)).sum()
                    o.register_hook(on_grad)
            return fn

        self._hooks += [m.register_forward_hook(hook(n, m)) for n, m in _leaves(self.net)]
        self._weights_before = [p.detach().float().clone() for _, p in self._named_params()]

    def _collect_grad_stats(self, norm: Optional[torch.Tensor]) -> None:
        params = [(n, p) for n, p in self._named_params()]
        grads = [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                 for _, p in params]
        norms = torch.stack(torch._foreach_norm(grads)).tolist() if grads else []
        layers: Dict[str, Dict] = {}
        for i, ((n, _), g) in enumerate(zip(params, grads)):
            layer = n.rpartition(".")[0] or n
            e = layers.setdefault(layer, {"layer": layer, "_params": [], "_sq": 0.0, "_samples": []})
            e["_params"].append(i)
            e["_sq"] += norms[i] ** 2
            flat = g.abs().flatten()
            e["_samples"].append(flat[:: max(1, flat.numel() // 16384)])
        rows = []
        for e in layers.values():
            s = torch.cat(e.pop("_samples"))
            q = torch.quantile(s, torch.tensor([0.5, 0.9, 0.99], dtype=s.dtype, device=s.device)).tolist() \
                if s.numel() else [0.0] * 3
            rows.append({"layer": e["layer"], "_params": e["_params"], "grad_norm": math.sqrt(e.pop("_sq")),
                         "grad_abs_p50": q[0], "grad_abs_p90": q[1], "grad_abs_p99": q[2]})
        acts = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in self._acts.items()}
        gp = {k: int(v) for k, v in self._grad_probe.items()}
        if gp.get("fp16_total"):
            nonzero = gp["fp16_total"] - gp["fp16_zero"]
            self.underflow = {"step": self._step, "subnormal_frac": gp["fp16_subnormal"] / max(1, nonzero),
                              "zero_frac": gp["fp16_zero"] / gp["fp16_total"],
                              "scaler": self.precision.scale_tensor() is not None}
            if self.underflow["subnormal_frac"] > 0.1:
                self.note("fp16_underflow", f"fp16 gradient underflow at step {self._step}: "
                                            f"{100 * self.underflow['subnormal_frac']:.1f}% of the non-zero activation "
                                            f"gradients are below fp16's normal range ({FP16_MIN_NORMAL:.2g}, "
                                            "precision lost; below 6e-8 they become 0) "
                                            + ("even with loss scaling: raise precision.init_scale, or use bf16"
                                               if self.underflow["scaler"] else
                                               "because no loss scaling is on: keep precision.grad_scaler=true "
                                               "(GradScaler) with fp16, or use precision=bf16"))
        gn = [r["grad_norm"] for r in rows]
        self._stats_row = {"step": self._step,
                           "grad_norm": math.sqrt(sum(v * v for v in gn)) if norm is None else float(norm),
                           "layers": rows, "activations": acts, "fp16_grad": self.underflow}
        if self._weights_before is None:
            for r in rows:
                r.pop("_params")

    def _write_stats(self, row: Dict) -> None:
        if self.stats_path is None:
            return
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.log is not None:
            gn = sorted(r["grad_norm"] for r in row["layers"])
            q = lambda f: gn[min(len(gn) - 1, int(f * len(gn)))] if gn else float("nan")  # noqa: E731
            dead = [a["dead_frac"] for a in row["activations"].values() if "dead_frac" in a]
            ratios = [r["update_ratio"] for r in row["layers"] if math.isfinite(r.get("update_ratio", float("nan")))]
            scalars = {"stats/grad_norm": row["grad_norm"], "stats/layer_grad_norm_min": q(0.0),
                       "stats/layer_grad_norm_p50": q(0.5), "stats/layer_grad_norm_max": q(1.0)}
            if dead:
                scalars["stats/dead_relu_frac"] = sum(dead) / len(dead)
            if ratios:
                scalars["stats/update_ratio_max"] = max(ratios)
            detail = {f"grad_norm/{r['layer']}": r["grad_norm"] for r in row["layers"]}
            detail.update({f"act_std/{k}": a["act_std"] for k, a in row["activations"].items()})
            self.log(row["step"], scalars, detail)

    def _clear_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# --- overfit one batch -----------------------------------------------------------------------------------------
def _host_norm(grads: List[torch.Tensor]) -> float:
    """The global norm of `grads` as a host number (a DTensor's through its full value)."""
    norm = total_norm(grads)
    return float(full_value(norm))


def _host_values(got: List[float], norms: int) -> List[float]:
    """[loss, per-tensor gradient norms..., (scale)] read from the device -> [loss, (global norm), (scale)]."""
    if norms <= 1:
        return got
    return [got[0], math.hypot(*got[1:1 + norms]), *got[1 + norms:]]


class LabelProbe:
    """A 1-NN probe's val accuracy against the accuracy labels independent of the inputs would give.

    Under independence the number of matches is Binomial(n, chance); `z` is the normal approximation's score, and
    the probe counts as at chance when z < 2 (one-sided p > 0.023).
    """
    MIN_VAL = 30  # fewer val samples cannot tell a weak signal from none

    def __init__(self, acc: float, n: int, chance: float):
        self.acc, self.n, self.chance = acc, n, chance

    @property
    def z(self) -> float:
        return (self.acc - self.chance) / max(math.sqrt(self.chance * (1 - self.chance) / self.n), 1e-12)

    @property
    def at_chance(self) -> bool:
        return self.z < 2.0

    def p_text(self) -> str:
        p = 0.5 * math.erfc(self.z / math.sqrt(2))
        return f"z = {self.z:.1f}, one-sided p " + (f"= {p:.2g}" if p >= 1e-6 else "< 1e-6")

    def describe(self) -> str:
        return (f"a 1-nearest-neighbour classifier on the raw training inputs scores {100 * self.acc:.1f}% on "
                f"{self.n} val samples (chance {100 * self.chance:.1f}%)")


def overfit_verdict(losses: List[float], grad_norms: List[float], target: float, findings: Dict[str, str],
                    lr: float, halted: Optional[str] = None) -> Dict:
    """Pass when the batch's loss fell below `target`; otherwise the likely causes, from the curve."""
    causes: List[str] = []
    passed = bool(losses) and losses[-1] < target and halted is None
    first = losses[0] if losses else float("nan")
    last = losses[-1] if losses else float("nan")
    best = min(losses) if losses else float("nan")
    finite_norms = [g for g in grad_norms if math.isfinite(g)]
    if halted:
        causes.append(halted)
    causes += [m for m in findings.values() if m != halted]  # a halting finding is already the halt message
    if not passed and not halted and losses and "lr_too_high" not in findings:  # else the same diagnosis again
        spike = max(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else -1.0)
        if losses[spike] > 3 * first or last > 1.5 * first:
            causes.append(f"the loss jumped from {first:.3g} to {losses[spike]:.3g} at step {spike + 1} and ended at "
                          f"{last:.3g}: training diverges; the learning rate is too high (optimizer.lr={lr:.3g}): "
                          "lower it 10x or run mode=lr_find")
        elif best < 0.5 * first and last > 3 * best:
            causes.append(f"the loss went {first:.3g} -> best {best:.3g} -> {last:.3g}: it diverges after a good "
                          f"start; the learning rate is too high (optimizer.lr={lr:.3g}): lower it or add warmup")
        elif last > 0.9 * first:
            if finite_norms and max(finite_norms) < 1e-7:
                causes.append(f"the loss does not move ({first:.3g} -> {last:.3g}) and the gradient norm is "
                              f"{max(finite_norms):.2g}: no gradient reaches the weights (a detached graph, frozen "
                              "parameters, or dead ReLUs)")
            else:
                causes.append(f"the loss barely moves ({first:.3g} -> {last:.3g}): the learning rate may be too "
                              f"low (optimizer.lr={lr:.3g}; run mode=lr_find), or the loss does not match the "
                              "targets (softmax fed to CrossEntropyLoss, wrong label column)")
        else:
            causes.append(f"the loss falls ({first:.3g} -> {last:.3g}) but not below {target:g} in {len(losses)} "
                          "steps: raise doctor.overfit_steps or optimizer.lr, or the model is too small / too "
                          "constrained to memorise one batch")
    # `new_causes`: the ones the doctor has not already printed while the steps ran (each diagnosis prints once)
    return {"passed": passed, "steps": len(losses), "first_loss": first, "final_loss": last, "best_loss": best,
            "target": target, "causes": causes, "new_causes": [c for c in causes if c not in findings.values()]}


def overfit_settings(cfg) -> List[str]:
    """mode=overfit_batch: everything that keeps a model from memorising one batch goes off (augmentation,
    dropout, stochastic depth, weight decay, label smoothing, MixUp/CutMix, EMA, schedules, curriculum,
    distillation). Mutates `cfg`; returns "key: old -> new" for what changed."""
    off = {"regularization.dropout": 0.0, "regularization.stochastic_depth": 0.0,
           "regularization.label_smoothing": 0.0, "regularization.mixup_alpha": 0.0,
           "regularization.cutmix_alpha": 0.0, "regularization.random_erasing": 0.0,
           "regularization.ema_decay": 0.0, "regularization.early_stopping_patience": 0,
           "optimizer.weight_decay": 0.0, "data.augment": False, "schedule.name": "constant",
           "schedule.warmup_steps": 0, "schedule.warmup_fraction": 0.0, "schedule.warmup_epochs": 0.0,
           "curriculum.name": "off", "distillation.name": "off", "trainer.accumulation_steps": 1}
    from omegaconf import OmegaConf

    changed = []
    for key, value in off.items():
        old = OmegaConf.select(cfg, key)
        if key == "regularization.dropout" and old is None and not cfg.model.dropout:
            continue
        if old != value:
            OmegaConf.update(cfg, key, value)
            changed.append(f"{key}: {old} -> {value}")
    return changed


def permute_labels(ds, seed: int) -> None:
    """The permuted_labels teaching fault: training labels shuffled across samples (val keeps its true labels)."""
    if not hasattr(ds, "y") or not hasattr(ds, "x"):
        raise TrainrunError("doctor.fault=permuted_labels needs an in-memory dataset (digits, mnist5k, synthetic, "
                            "tensors)")
    g = torch.Generator().manual_seed(10_000 + seed)
    ds.y = ds.y[torch.randperm(len(ds.y), generator=g)]


class SummedLoss(nn.Module):
    """The reduction_sum teaching fault: the batch's loss summed, not averaged (mean x batch size)."""

    def __init__(self, loss_fn: nn.Module):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, target) * logits.shape[0]


def guard_sync_mode(cfg, precision, ema: bool) -> str:
    """doctor.guard_sync resolved: auto is deferred on CUDA (where a per-step host sync stalls the queue of GPU
    work) and step on CPU (no run-ahead to keep; the checkpoints stay byte for byte those of earlier versions).
    Deferred undoes a bad step after the fact, so it needs nan_guard=halt (a skipped step's successor already ran
    on the bad weights), no fp16 GradScaler (its step syncs anyway) and no EMA (its schedule counts applied steps
    on the host)."""
    mode = cfg.get("guard_sync", "auto")
    blocker = ("doctor.nan_guard=skip" if cfg.nan_guard == "skip" else
               "precision=fp16 with its GradScaler" if precision.scaler.is_enabled() else
               "regularization.ema_decay>0 (EMA)" if ema else None)
    if mode == "deferred" and blocker is not None:
        raise ConfigError(f"doctor.guard_sync=deferred does not work with {blocker}: the verdict must come before "
                          "the update there; use doctor.guard_sync=step (or auto)")
    if mode == "auto":
        return "deferred" if precision.device.type == "cuda" and blocker is None else "step"
    return mode


def check(cfg) -> None:
    """Range checks of the doctor section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "doctor")
    checks.one_of("nan_guard", ("halt", "skip", "off"))
    checks.one_of("guard_sync", ("auto", "step", "deferred"))
    checks.one_of("fault", ("none", "permuted_labels", "no_zero_grad", "reduction_sum"))
    checks.positive("max_consecutive_skips", "overfit_steps", "overfit_loss", "min_loss_scale")
    checks.positive("stats_every", "badstep_checkpoints", "inject_nan_step", allow_zero=True)
    if cfg.inject_nan_step and not cfg.inject_nan_layer:
        checks.fail("inject_nan_layer", "doctor.inject_nan_step needs the module to poison, e.g. "
                                        "doctor.inject_nan_layer=3 (see `trainrun mode=init_report` for names)")
