"""Precision policy: autocast dtype, GradScaler, TF32, and the unscale -> clip -> step -> update order."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's sharded gradient norm's) whole value as a plain tensor; any other tensor as itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def total_norm(grads) -> torch.Tensor:
    """The global L2 norm as a device tensor. Plain same-device tensors take a short path (one fused per-tensor
    norm, one stack); anything else (DTensors under FSDP2, several devices) goes through torch's get_total_norm."""
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if type(first) is torch.Tensor and all(type(g) is torch.Tensor and g.device == first.device for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.nn.utils.get_total_norm(grads)


class PrecisionPolicy:
    def __init__(self, cfg, device: torch.device):
        self.name, self.device = cfg.name, device
        self.dtype = DTYPES[cfg.name]
        # Dynamic loss scaling only for fp16: bf16 has fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale,
                                           growth_interval=cfg.growth_interval,
                                           enabled=cfg.name == "fp16" and cfg.get("grad_scaler", True))
        if device.type == "cuda":
            tf32 = cfg.allow_tf32 and cfg.name == "fp32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self.scaling = self.scaler.is_enabled()  # fixed for the run: the hot path tests a bool, not the scaler

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaling else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *,
             clip_norm: Optional[float], clip_value: Optional[float], want_norm: bool) -> Optional[torch.Tensor]:
        """Unscale -> (norm, clip) -> optimizer step (skipped by the scaler on inf/NaN) -> scaler update.

        Returns the pre-clip global grad norm as a tensor (no host sync) when asked for or clipping.
        """
        norm = self.unscale_and_clip(optimizer, params, clip_norm=clip_norm, clip_value=clip_value,
                                     want_norm=want_norm)
        self.update(optimizer)
        return norm

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *,
                         clip_norm: Optional[float], clip_value: Optional[float],
                         want_norm: bool) -> Optional[torch.Tensor]:
        """The first half of `step`: gradients back in true units, the pre-clip global norm, clipping."""
        if self.scaling:
            self.scaler.unscale_(optimizer)
        norm = None
        if clip_norm is None and clip_value is None and not want_norm:
            return norm
        params = [p for p in params if p.grad is not None]
        if clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        elif want_norm or clip_value is not None:
            norm = total_norm([p.grad for p in params])
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        return norm

    def update(self, optimizer: torch.optim.Optimizer, apply: bool = True) -> None:
        """The second half: the optimizer step (unless `apply` is False: a step the NaN guard skips) and the
        scaler's scale update."""
        if not self.scaling:
            if apply:
                optimizer.step()
            return
        if apply:
            self.scaler.step(optimizer)
        self.scaler.update()

    def scale_tensor(self) -> Optional[torch.Tensor]:
        """The current loss scale as a device tensor (no host sync), or None without a scaler."""
        return self.scaler._scale if self.scaling else None

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state) -> None:
        if state:
            self.scaler.load_state_dict(state)


def check(cfg) -> None:
    """Range checks of the precision section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "precision")
    checks.one_of("name", ("fp32", "fp16", "bf16"))
    checks.positive("init_scale", "growth_interval")
