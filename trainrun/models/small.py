"""Small models for small inputs: an MLP and a compact CNN."""
from __future__ import annotations

import torch.nn as nn

from trainrun.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """MLP: flatten -> [Linear -> act -> dropout] x len(hidden_sizes) (or x depth) -> Linear."""
    layers = [nn.Flatten()]
    width = 1
    for s in input_shape:
        width *= s
    sizes = list(cfg.hidden_sizes)
    depth = int(getattr(cfg, "depth", 0) or 0)
    if depth > 0:
        if not sizes:
            raise ConfigError(f"model.depth={depth}: needs model.hidden_sizes to give the width, e.g. "
                              "model.hidden_sizes=[256]")
        sizes = [sizes[0]] * depth
    for h in sizes:
        layers += [nn.Linear(width, h), ACTIVATIONS[cfg.activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """Small CNN: [conv3x3 -> BN -> act] x2 per stage, 2x2 max-pool between stages, global pool -> Linear."""
    act = ACTIVATIONS[cfg.activation]
    c_in = input_shape[0]
    layers = []
    for i, c in enumerate(cfg.channels):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act(),
                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c_in, num_classes))
    return nn.Sequential(*layers)


# the model.* keys each factory reads (dropout: every model); the config tree prints only the selected model's
mlp.config_keys = ("hidden_sizes", "depth", "activation", "dropout")
cnn.config_keys = ("channels", "activation", "dropout")
