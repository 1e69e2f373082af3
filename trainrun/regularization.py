"""Regularization: the training loss (with label smoothing) and the dropout setting.

Gradient clipping lives in the precision policy's step, where it must sit between unscale and step.
"""
from __future__ import annotations

import torch.nn as nn


def build_loss(cfg) -> nn.Module:
    # torch's label smoothing is exactly y = (1 - eps) * onehot + eps / K.
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def effective_dropout(reg_cfg, model_cfg) -> float:
    return model_cfg.dropout if reg_cfg.dropout is None else reg_cfg.dropout
