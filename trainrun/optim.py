"""Optimizer factory and parameter groups (no weight decay on norms, biases and embeddings)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set:
    """Parameter names that should not be weight-decayed: norm weights, biases, embeddings, 1-d params."""
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, (*_NORMS, nn.Embedding)) or "norm" in type(mod).__name__.lower() \
                    or p_name == "bias" or p.ndim <= 1:
                names.add(full)
    return names


def effective_lr(cfg, global_batch: int) -> float:
    if cfg.scale_lr_with_batch:
        return cfg.lr * global_batch / cfg.reference_batch_size
    return cfg.lr


def param_groups(model: nn.Module, cfg) -> List[Dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The split does not depend on the decay value, so a resume may change weight_decay freely.
    if not cfg.no_decay_norm_bias:
        return [{"params": [p for _, p in params], "name": "all", "decay": True}]
    skip = no_decay_names(model)
    decay = [p for n, p in params if n not in skip]
    no_decay = [p for n, p in params if n in skip]
    return [g for g in ({"params": decay, "name": "decay", "decay": True},
                        {"params": no_decay, "name": "no_decay", "decay": False}) if g["params"]]


def apply_hparams(optimizer: torch.optim.Optimizer, cfg, global_batch: int) -> None:
    """Write the config's hyperparameters into every group (also after loading a checkpoint's state)."""
    lr = effective_lr(cfg, global_batch)
    for g in optimizer.param_groups:
        g["base_lr"] = lr
        g["lr"] = lr
        g["weight_decay"] = cfg.weight_decay if g.get("decay", True) else 0.0
        if cfg.name == "sgd":
            g["momentum"], g["nesterov"] = cfg.momentum, cfg.nesterov
        else:
            g["betas"], g["eps"] = tuple(cfg.betas), cfg.eps


def build_optimizer(model: nn.Module, cfg, global_batch: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    lr = effective_lr(cfg, global_batch)
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    else:
        raise ValueError(cfg.name)
    apply_hparams(opt, cfg, global_batch)
    return opt
