"""Learning-rate schedules as functions of the optimizer step.

`multiplier(t)` is the factor on the base LR used by optimizer step t (t = steps already taken),
with the same conventions as the `transformers` schedule functions (warmup starts at 0 and
reaches the base LR at t = warmup). Every step-driven schedule is a pure function of t, so a
resumed run recomputes it exactly and a changed base LR on resume simply takes effect.

Each schedule equals a reference implementation, checked step by step in tests/test_schedules.py:

- constant: transformers `get_constant_schedule_with_warmup`
- warmup_cosine: transformers `get_cosine_schedule_with_warmup`, or with min_lr_ratio > 0
  `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_lr_ratio)`
- warmup_linear: transformers `get_linear_schedule_with_warmup` (min_lr_ratio r: r + (1 - r) * its factor)
- polynomial: transformers `get_polynomial_decay_schedule_with_warmup(lr_end=lr * min_lr_ratio, power=power)`
- wsd: transformers `get_wsd_schedule` with decay steps = round(decay_fraction * total), decay_type
- step / multistep: torch `StepLR` / `MultiStepLR` (milestones are fractions of the run)
- exponential: torch `ExponentialLR`, gamma ** t
  (step, multistep, exponential: a warmup, if any, replaces the first steps; t counts from 0 regardless)
- onecycle: torch `OneCycleLR` (anneal 'cos', two phases, max_lr = the base LR; the LR only, momentum untouched)
- plateau: torch `ReduceLROnPlateau` (threshold_mode 'rel') on `checkpoint.monitor`, times the linear warmup

Where the references differ past the end of the run (t > total), these schedules hold their end
value (transformers' cosine rises again, OneCycleLR raises): a shortened resumed run stays sane.
The horizon `total` is the run's length unless `schedule.total_steps` pins it: a run extended on
resume keeps its original curve that way (and runs the extra steps at the end value); otherwise the
curve is re-stretched over the new length and `horizon_change` says what that does to the LR.

Warmup: the first non-zero of warmup_steps / warmup_fraction / warmup_epochs; when none of them is
set at all, the schedule option's `default_warmup_fraction` (5% for warmup_cosine, ...). So an
explicit key, zero included, wins over the option's default.
The linear warmup starts from `warmup_start_factor` (0 by default, as transformers; torchvision's
reference recipes start from --lr-warmup-decay 0.01 with torch LinearLR, stepped per epoch there, per step here).

`plateau` is the one stateful schedule: `on_eval(value)` updates its counters, `state_dict()` carries
them (plain ints/floats, loadable with `torch.load(weights_only=True)`), and a reduction takes effect
on the very next optimizer step, as `ReduceLROnPlateau.step(metric)` after validation does.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError
from trainrun.registry import Registry

if TYPE_CHECKING:  # torch only in annotations, so trainrun.config can import ScheduleConfig without loading torch
    import torch

log = logging.getLogger("trainrun")


@dataclass
class ScheduleConfig:
    # constant | warmup_cosine | warmup_linear | step | multistep | exponential | wsd | onecycle | polynomial | plateau
    name: str = "constant"
    # At most one of the three warmup_* may be non-zero. Unset (null), the option's default_warmup_fraction applies,
    # so an explicit key (warmup_steps=10, warmup_fraction=0) always wins over the schedule option's own default.
    warmup_steps: Optional[int] = None
    warmup_fraction: Optional[float] = None  # of the total optimizer steps
    warmup_epochs: Optional[float] = None
    default_warmup_fraction: float = 0.0  # set by the schedule option (configs/schedule/*.yaml), not by users
    # the LR factor the linear warmup starts from (torch LinearLR's start_factor; torchvision's --lr-warmup-decay)
    warmup_start_factor: float = 0.0
    total_steps: Optional[int] = None  # the schedule's horizon in optimizer steps; null: the run's length
    min_lr_ratio: float = 0.0  # cosine/linear/wsd/polynomial end at lr * min_lr_ratio
    step_size: int = 0  # step: multiply by gamma every step_size optimizer steps
    milestones: List[float] = field(default_factory=list)  # multistep: fractions of the total steps
    gamma: float = 0.1  # step/multistep factor; exponential: per-step factor
    decay_fraction: float = 0.1  # wsd: the final fraction of the steps that decays
    decay_type: str = "cosine"  # wsd: linear | cosine | 1-sqrt
    power: float = 1.0  # polynomial
    pct_start: float = 0.3  # onecycle: fraction of the steps spent increasing
    div_factor: float = 25.0  # onecycle: initial lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = initial lr / final_div_factor
    factor: float = 0.5  # plateau: LR factor on a plateau
    patience: int = 3  # plateau: evaluations without improvement before reducing
    threshold: float = 1e-4  # plateau: relative improvement that counts
    cooldown: int = 0  # plateau: evaluations to wait after a reduction



WARMUP_KEYS = ("warmup_steps", "warmup_fraction", "warmup_epochs")
PLATEAU_EPS = 1e-8  # ReduceLROnPlateau's eps: smaller reductions are ignored (here in units of the base LR)


def requested_warmup(cfg, total_steps: int, steps_per_epoch: int) -> int:
    """Warmup steps as configured (before capping at the run's length)."""
    if cfg.warmup_steps:
        return cfg.warmup_steps
    if cfg.warmup_fraction:
        return int(round(cfg.warmup_fraction * total_steps))
    if cfg.warmup_epochs:
        return int(round(cfg.warmup_epochs * steps_per_epoch))
    if all(getattr(cfg, key, None) is None for key in WARMUP_KEYS):  # none named: the option's own default
        return int(round((getattr(cfg, "default_warmup_fraction", 0.0) or 0.0) * total_steps))
    return 0


def resolve_warmup(cfg, total_steps: int, steps_per_epoch: int) -> int:
    return min(requested_warmup(cfg, total_steps, steps_per_epoch), total_steps)


class Schedule:
    def __init__(self, cfg, total_steps: int, steps_per_epoch: int, monitor_mode: str = "max"):
        self.name = cfg.name
        self._fn: Optional[Callable] = None  # SCHEDULES' function for `name`, looked up once
        self._set_horizon(cfg, getattr(cfg, "total_steps", None) or total_steps, steps_per_epoch)
        wanted = requested_warmup(cfg, self.total, steps_per_epoch)
        if wanted > self.total:
            key = next((k for k in WARMUP_KEYS if getattr(cfg, k, None)), "default_warmup_fraction")
            log.warning("schedule.%s=%s asks for a %d-step warmup, longer than the schedule's %d steps: the LR never "
                        "reaches optimizer.lr; shorten the warmup or train longer", key, getattr(cfg, key), wanted,
                        self.total)
        self.min_ratio, self.gamma, self.step_size = cfg.min_lr_ratio, cfg.gamma, cfg.step_size
        self.start_factor = getattr(cfg, "warmup_start_factor", 0.0) or 0.0
        self.decay_type = cfg.decay_type
        # polynomial
        self.power = cfg.power
        # onecycle
        self.pct_start, self.div_factor, self.final_div_factor = cfg.pct_start, cfg.div_factor, cfg.final_div_factor
        if self.name == "onecycle":
            for key in WARMUP_KEYS:
                if getattr(cfg, key):
                    raise ConfigError(f"schedule.{key}={getattr(cfg, key)!r}: schedule=onecycle has its own warmup "
                                      f"(the first schedule.pct_start of the run rises from lr/div_factor to lr); "
                                      f"set schedule.{key}=0")
        # plateau
        if monitor_mode not in ("max", "min"):
            raise ConfigError(f"checkpoint.monitor_mode={monitor_mode!r}: must be max or min")
        self.mode = monitor_mode
        self.factor, self.patience = cfg.factor, cfg.patience
        self.threshold, self.cooldown = cfg.threshold, cfg.cooldown
        self.best = -math.inf if self.mode == "max" else math.inf
        self.num_bad_evals = 0
        self.cooldown_counter = 0
        self.scale = 1.0  # the plateau factor on the LR: factor ** reductions, floored at min_lr_ratio
        self._applied: Optional[Tuple[torch.optim.Optimizer, int]] = None  # last apply(), re-applied on a reduction

    def _set_horizon(self, cfg, total_steps: int, steps_per_epoch: int) -> None:
        """Everything that depends on the schedule's length."""
        self.total = max(1, total_steps)
        self.warmup = resolve_warmup(cfg, self.total, steps_per_epoch)
        self.milestones = [int(round(f * self.total)) for f in cfg.milestones]
        self.decay_steps = int(round(cfg.decay_fraction * self.total))  # wsd

    # ----- the LR as a function of the step -----------------------------------------------------------------

    def multiplier(self, t: int) -> float:
        if self._fn is None:
            self._fn = SCHEDULES.get(self.name)
        return self._fn(self, t)

    def _polynomial(self, t: int) -> float:
        """transformers' lambda with lr_init = 1 and lr_end = min_lr_ratio.

        transformers divides (lr_range * pct ** power + lr_end) by lr_init; with lr_end = lr_init * min_lr_ratio that
        ratio is (1 - r) * pct ** power + r for any lr_init (and for every param group, since LambdaLR applies the
        one lambda to each group's own initial LR), so the multiplier is independent of the base LR.
        """
        r = self.min_ratio
        if t >= self.total:  # transformers: t > T returns lr_end / lr_init; t == T gives the same value
            return r
        pct_remaining = 1 - (t - self.warmup) / (self.total - self.warmup)  # t < T here, so T > warmup
        return (1.0 - r) * pct_remaining ** self.power + r

    def _wsd(self, t: int) -> float:
        """transformers' `_get_wsd_scheduler_lambda` (warmup_type linear, num_cycles 0.5), line for line."""
        w, d, r = self.warmup, self.decay_steps, self.min_ratio
        stable = self.total - w - d
        if t < w:  # note: WSD warms up from min_lr_ratio, not from 0
            return max(0.0, float(t) / float(max(1, w)) * (1.0 - r) + r)
        if t < w + stable:
            return 1.0
        if t < w + stable + d:
            progress = float(t - w - stable) / float(max(1, d))
            if self.decay_type == "linear":
                f = 1.0 - progress
            elif self.decay_type == "cosine":
                f = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
            elif self.decay_type == "1-sqrt":
                f = 1.0 - math.sqrt(progress)
            else:
                raise ValueError(self.decay_type)
            return max(0.0, f * (1.0 - r) + r)
        return float(r)

    def _onecycle(self, t: int) -> float:
        """torch OneCycleLR.get_lr (three_phase=False, anneal 'cos') with max_lr = 1, at last_epoch = t."""
        t = min(t, self.total)  # OneCycleLR raises past total_steps; hold the value it has at total_steps
        initial = 1.0 / self.div_factor
        phases = ((float(self.pct_start * self.total) - 1, initial, 1.0),
                  (self.total - 1, 1.0, initial / self.final_div_factor))
        start_step = 0.0
        for i, (end_step, start_lr, end_lr) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                span = end_step - start_step
                pct = (t - start_step) / span if span else 1.0  # torch divides by zero here (a 1-step phase)
                return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
            start_step = end_step
        raise AssertionError("unreachable")

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> float:
        """Set every group's LR for optimizer step t; returns the multiplier."""
        m = self.multiplier(t)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * m
        self._applied = (optimizer, t)
        return m

    # ----- metric-driven: plateau ---------------------------------------------------------------------------

    def _is_better(self, value: float) -> bool:
        # threshold_mode='rel' exactly as ReduceLROnPlateau; NaN compares False, so it never improves
        if self.mode == "min":
            return value < self.best * (1.0 - self.threshold)
        return value > self.best * (self.threshold + 1.0)

    def on_eval(self, value: Any) -> None:
        """Metric-driven schedules (plateau) react to each evaluation of the monitored metric.

        ReduceLROnPlateau.step semantics; a missing (None) or NaN value counts as no improvement. A reduction is
        applied to the optimizer last passed to `apply()` at once, so it holds from the next optimizer step.
        """
        if self.name != "plateau":
            return
        current = math.nan if value is None else float(value)
        if self._is_better(current):
            self.best = current
            self.num_bad_evals = 0
        else:
            self.num_bad_evals += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_evals = 0  # bad evaluations during the cooldown are ignored
        if self.num_bad_evals > self.patience:
            new = max(self.scale * self.factor, self.min_ratio)
            if self.scale - new > PLATEAU_EPS:
                self.scale = new
                if self._applied is not None:
                    self.apply(*self._applied)
            self.cooldown_counter = self.cooldown
            self.num_bad_evals = 0

    # ----- checkpoint state ---------------------------------------------------------------------------------

    def state_dict(self) -> Dict:
        state: Dict[str, Any] = {"name": self.name, "total": self.total, "warmup": self.warmup}
        if self.name == "plateau":
            state.update(mode=self.mode, best=float(self.best), num_bad_evals=int(self.num_bad_evals),
                         cooldown_counter=int(self.cooldown_counter), scale=float(self.scale))
        return state

    def load_state_dict(self, state: Dict) -> None:
        """Step-driven schedules are pure functions of the step: nothing to restore. Plateau restores its counters
        (when the checkpoint was written by a plateau schedule with the same monitor mode; otherwise it starts fresh).
        """
        if self.name != "plateau" or state.get("name") != "plateau" or state.get("mode", self.mode) != self.mode:
            return
        self.best = float(state["best"])
        self.num_bad_evals = int(state["num_bad_evals"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.scale = float(state["scale"])


SCHEDULES = Registry("schedule.name")  # name -> multiplier(schedule, t): the LR factor of optimizer step t


def linear_warmup(schedule: Schedule, t: int) -> float:
    """torch LinearLR(start_factor=s, total_iters=warmup) in closed form: s + (1 - s) * t / warmup."""
    s = schedule.start_factor
    return s + (1.0 - s) * (t / max(1, schedule.warmup))


def after_linear_warmup(shape: Callable[[Schedule, int], float]) -> Callable[[Schedule, int], float]:
    """The LR rises linearly from warmup_start_factor (default 0) over the warmup steps, then follows `shape`."""
    def multiplier(schedule: Schedule, t: int) -> float:
        if t < schedule.warmup:
            return linear_warmup(schedule, t)
        return shape(schedule, t)
    multiplier.__doc__ = shape.__doc__
    return multiplier


def _progress(schedule: Schedule, t: int) -> float:
    return min(1.0, (t - schedule.warmup) / max(1, schedule.total - schedule.warmup))


def _cosine(schedule: Schedule, t: int) -> float:
    """cosine decay to optimizer.lr * min_lr_ratio"""
    r = schedule.min_ratio
    return r + (1 - r) * 0.5 * (1.0 + math.cos(math.pi * _progress(schedule, t)))


def _linear(schedule: Schedule, t: int) -> float:
    """linear decay to optimizer.lr * min_lr_ratio"""
    # transformers' form, (T - t) / (T - W), is bitwise what LambdaLR sees
    linear = max(0.0, float(schedule.total - t) / float(max(1, schedule.total - schedule.warmup)))
    return schedule.min_ratio + (1 - schedule.min_ratio) * linear


def _plateau(schedule: Schedule, t: int) -> float:
    """the LR times factor whenever checkpoint.monitor stops improving (ReduceLROnPlateau)"""
    return (linear_warmup(schedule, t) if t < schedule.warmup else 1.0) * schedule.scale


SCHEDULES.register("constant", after_linear_warmup(lambda schedule, t: 1.0), doc="constant LR after the warmup")
SCHEDULES.register("warmup_cosine", after_linear_warmup(_cosine))
SCHEDULES.register("warmup_linear", after_linear_warmup(_linear))
SCHEDULES.register("step", after_linear_warmup(lambda schedule, t: schedule.gamma ** (t // schedule.step_size)),
                   doc="the LR times gamma every step_size optimizer steps (StepLR)")
SCHEDULES.register("multistep",
                   after_linear_warmup(lambda schedule, t: schedule.gamma ** sum(1 for m in schedule.milestones
                                                                                 if t >= m)),
                   doc="the LR times gamma at each milestone fraction of the run (MultiStepLR)")
SCHEDULES.register("exponential", after_linear_warmup(lambda schedule, t: schedule.gamma ** t),
                   doc="the LR times gamma every optimizer step (ExponentialLR)")
SCHEDULES.register("wsd", Schedule._wsd, doc="warmup, stable, then a decay over the last decay_fraction")
SCHEDULES.register("onecycle", Schedule._onecycle, doc="one cycle up to the LR and down (OneCycleLR)")
SCHEDULES.register("polynomial", after_linear_warmup(Schedule._polynomial),
                   doc="polynomial decay (power) to optimizer.lr * min_lr_ratio")
SCHEDULES.register("plateau", _plateau)


def check(cfg) -> None:
    """Range checks of the schedule section."""
    checks = SectionChecks(cfg, "schedule")
    checks.one_of("name", SCHEDULES.names())
    checks.one_of("decay_type", ("linear", "cosine", "1-sqrt"))
    checks.positive("power", "div_factor", "final_div_factor", "total_steps")
    checks.positive("warmup_steps", "warmup_fraction", "warmup_epochs", "min_lr_ratio", "step_size", "patience",
                    "cooldown", "threshold", allow_zero=True)
    checks.unit("warmup_fraction", "default_warmup_fraction", "factor")
    checks.unit("decay_fraction", "pct_start", "min_lr_ratio", "gamma", "warmup_start_factor", closed=True)
    if cfg.warmup_start_factor and cfg.name in ("wsd", "onecycle"):
        checks.fail("warmup_start_factor", f"schedule={cfg.name} sets where its warmup starts itself ("
                                           + ("schedule.min_lr_ratio" if cfg.name == "wsd" else "lr/div_factor")
                                           + "); set schedule.warmup_start_factor=0")
    warmups = [key for key in WARMUP_KEYS if getattr(cfg, key)]
    if cfg.name == "onecycle" and warmups:
        checks.fail(warmups[0], "schedule=onecycle has its own warmup (schedule.pct_start); set "
                                f"schedule.{warmups[0]}=0")
    if len(warmups) > 1:
        checks.fail(warmups[1], f"set only one of schedule.{warmups[0]} / schedule.{warmups[1]}")
    if cfg.name == "step" and cfg.step_size <= 0:
        checks.fail("step_size", "schedule=step needs schedule.step_size > 0 (optimizer steps)")
    milestones = list(cfg.milestones)
    if cfg.name == "multistep" and (not milestones or milestones != sorted(milestones)
                                    or not all(0 < m < 1 for m in milestones)):
        checks.fail("milestones", "multistep needs increasing fractions of the run in (0, 1), e.g. [0.3, 0.6, 0.9]")


def horizon_change(cfg, saved: Dict, schedule: Schedule, steps_per_epoch: int, step: int,
                   base_lr: float) -> Optional[str]:
    """On resume: when the run's length changed and that reshapes the LR curve from the resume step on (cosine,
    linear, ...; not constant or step), say what the LR does at the resume step and how to keep the original curve."""
    old_total = int(saved.get("total", schedule.total))
    if old_total == schedule.total:
        return None
    old = copy.copy(schedule)
    old._set_horizon(cfg, old_total, steps_per_epoch)
    stride = max(1, (max(old_total, schedule.total) - step) // 100)
    probe = range(step, max(old_total, schedule.total) + 1, stride)
    if all(old.multiplier(t) == schedule.multiplier(t) for t in probe):
        return None
    before, after = base_lr * old.multiplier(step), base_lr * schedule.multiplier(step)
    jump = " (it jumps back up)" if after > before else " (it drops)" if after < before else ""
    return (f"the schedule's horizon changes from {old_total} to {schedule.total} optimizer steps, so the {cfg.name} "
            f"curve is re-stretched: the LR at the resume step {step} goes from {before:.4g} (the original curve) to "
            f"{after:.4g}{jump}; to keep the original curve, resume with schedule.total_steps={old_total} (steps past "
            "it run at its end LR)")
