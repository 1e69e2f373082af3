"""Weight initialisation schemes, applied after the model is built and before the optimizer sees it."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainrun.errors import ConfigError

_GAIN_NONLINEARITY = {"relu": "relu", "gelu": "relu", "silu": "relu", "tanh": "tanh"}


def _weighted_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def apply_init(model: nn.Module, cfg, activation: str = "relu") -> nn.Module:
    """Re-initialise Linear/Conv weights (biases to 0) by `cfg.name`; `default` keeps torch's init."""
    nonlinearity = _GAIN_NONLINEARITY.get(activation, "relu")
    with torch.no_grad():
        if cfg.name != "default":
            for m in _weighted_layers(model):
                w = m.weight
                if cfg.name == "xavier_uniform":
                    nn.init.xavier_uniform_(w)
                elif cfg.name == "xavier_normal":
                    nn.init.xavier_normal_(w)
                elif cfg.name == "kaiming_uniform":
                    nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity=nonlinearity)
                elif cfg.name == "kaiming_normal":
                    nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity=nonlinearity)
                elif cfg.name == "orthogonal":
                    nn.init.orthogonal_(w, gain=nn.init.calculate_gain(nonlinearity))
                elif cfg.name == "trunc_normal":
                    nn.init.trunc_normal_(w, std=cfg.std, a=-2 * cfg.std, b=2 * cfg.std)
                else:
                    raise ConfigError(f"init.name={cfg.name!r}: unknown init scheme")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if cfg.zero_init_residual:
            n = zero_init_residual(model)
            if n == 0:
                raise ConfigError("init.zero_init_residual=true: the model has no residual blocks; "
                                  "use a resnet or set it to false")
        if cfg.zero_init_head:
            head = _weighted_layers(model)[-1]
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
    return model


def zero_init_residual(model: nn.Module) -> int:
    """Zero the last BatchNorm's weight in every torchvision residual block; returns how many."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    count = 0
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
            count += 1
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
            count += 1
    return count


def expected_std(scheme: str, fan_in: int, fan_out: int, nonlinearity: str = "relu") -> float:
    """The weight std a scheme targets (used by the tests and the docs)."""
    if scheme in ("xavier_uniform", "xavier_normal"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme in ("kaiming_uniform", "kaiming_normal"):
        return nn.init.calculate_gain(nonlinearity) / math.sqrt(fan_in)
    raise ValueError(scheme)
