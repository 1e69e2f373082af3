"""Learning-rate schedules as pure functions of the optimizer step.

`multiplier(t)` is the factor on the base LR used by optimizer step t (t = steps already taken),
with the same conventions as the `transformers` schedule functions (warmup starts at 0 and
reaches the base LR at t = warmup). Because the LR is a pure function of t, a resumed run
recomputes it exactly and a changed base LR on resume simply takes effect.
"""
from __future__ import annotations

import math
from typing import Dict

import torch


def resolve_warmup(cfg, total_steps: int, steps_per_epoch: int) -> int:
    if cfg.warmup_steps:
        w = cfg.warmup_steps
    elif cfg.warmup_fraction:
        w = int(round(cfg.warmup_fraction * total_steps))
    elif cfg.warmup_epochs:
        w = int(round(cfg.warmup_epochs * steps_per_epoch))
    else:
        w = 0
    return min(w, total_steps)


class Schedule:
    def __init__(self, cfg, total_steps: int, steps_per_epoch: int):
        self.name, self.total = cfg.name, max(1, total_steps)
        self.warmup = resolve_warmup(cfg, total_steps, steps_per_epoch)
        self.min_ratio, self.gamma, self.step_size = cfg.min_lr_ratio, cfg.gamma, cfg.step_size
        self.milestones = [int(round(f * self.total)) for f in cfg.milestones]

    def multiplier(self, t: int) -> float:
        if t < self.warmup:
            return t / max(1, self.warmup)
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** (t // self.step_size)
        if self.name == "multistep":
            return self.gamma ** sum(1 for m in self.milestones if t >= m)
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        if self.name == "warmup_cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "warmup_linear":
            return self.min_ratio + (1 - self.min_ratio) * (1.0 - progress)
        raise ValueError(self.name)

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> float:
        """Set every group's LR for optimizer step t; returns the multiplier."""
        m = self.multiplier(t)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * m
        return m

    def state_dict(self) -> Dict:
        return {"name": self.name, "total": self.total, "warmup": self.warmup}
