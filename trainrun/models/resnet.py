"""torchvision ResNets, with the stem adapted to the input's channels and size."""
from __future__ import annotations

import torch.nn as nn


def _adapt(model: nn.Module, cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    c_in = input_shape[0]
    if cfg.small_input:  # CIFAR-style stem: keep resolution for 8-64 px inputs
        model.conv1 = nn.Conv2d(c_in, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c_in != 3:
        model.conv1 = nn.Conv2d(c_in, 64, 7, stride=2, padding=3, bias=False)
    if dropout > 0:
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


def resnet18(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """torchvision ResNet-18 (BasicBlock, 11.7M params at 1000 classes)."""
    import torchvision  # deferred: importing torchvision costs ~1 s of startup

    return _adapt(torchvision.models.resnet18(num_classes=num_classes), cfg, input_shape, num_classes, dropout)


def resnet50(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """torchvision ResNet-50 (Bottleneck, 25.6M params at 1000 classes)."""
    import torchvision

    return _adapt(torchvision.models.resnet50(num_classes=num_classes), cfg, input_shape, num_classes, dropout)


resnet18.config_keys = resnet50.config_keys = ("small_input", "dropout")  # the model.* keys they read
