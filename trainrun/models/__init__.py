"""Model registry: name -> factory(model_cfg, input_shape, num_classes, dropout) -> nn.Module."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch.nn as nn

from trainrun.models.resnet import resnet18, resnet50
from trainrun.models.small import cnn, mlp
from trainrun.models.vit import vit

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit": vit,
}


def build_model(cfg, input_shape: Tuple[int, int, int], num_classes: int, dropout: float) -> nn.Module:
    return MODELS[cfg.name](cfg, tuple(input_shape), num_classes, dropout)


def describe_models() -> Dict[str, str]:
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in MODELS.items()}
