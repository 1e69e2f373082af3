"""Optimizer factory and parameter groups (no weight decay on norms, biases and embeddings; per-group LR factors).

Groups are split by (decayed?, matched `optimizer.lr_multipliers` pattern). The split depends on which
parameters are decayed and which pattern each name matches, never on the weight-decay or multiplier VALUES,
so a resume may change either and still load the checkpoint's optimizer state. Every group carries:
  name     "decay" / "no_decay" / "all", with "[pattern]" appended for a multiplier group
  decay    whether `optimizer.weight_decay` applies to it
  lr_pattern / lr_mult   the glob that claimed the group (None: no pattern) and its LR factor
`apply_hparams` writes the config's hyperparameters into every group (base_lr = effective lr * lr_mult); the
schedule then sets lr = base_lr * multiplier(step).
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError
from trainrun.registry import Registry

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class OptimizerFactory:
    """`torch_class(param_groups, lr=..., **hyperparameters(optimizer_cfg))` builds the optimizer; `apply_hparams`
    writes the same hyperparameters into every group again after a checkpoint's state is loaded, so a resume may
    change them."""
    torch_class: Callable[..., torch.optim.Optimizer]
    hyperparameters: Callable[[Any], Dict[str, Any]]


OPTIMIZERS = Registry("optimizer.name")


def register_optimizer(name: str, torch_class, hyperparameters, doc: str = "") -> None:
    """`optimizer.name=NAME` then builds `torch_class`; `hyperparameters(optimizer_cfg)` -> its keyword arguments."""
    OPTIMIZERS.register(name, OptimizerFactory(torch_class, hyperparameters), doc=doc)


def _betas_eps(cfg) -> Dict[str, Any]:
    return {"betas": tuple(cfg.betas), "eps": cfg.eps}


def _decoupled(cfg) -> Dict[str, Any]:
    return {**_betas_eps(cfg), "decoupled_weight_decay": bool(cfg.decoupled_weight_decay)}


register_optimizer("sgd", torch.optim.SGD, lambda cfg: {"momentum": cfg.momentum, "nesterov": cfg.nesterov},
                   "SGD with (Nesterov) momentum")
register_optimizer("adam", torch.optim.Adam, _betas_eps, "Adam")
register_optimizer("adamw", torch.optim.AdamW, _betas_eps, "AdamW (decoupled weight decay)")
register_optimizer("rmsprop", torch.optim.RMSprop,
                   lambda cfg: {"alpha": cfg.alpha, "momentum": cfg.momentum, "eps": cfg.eps}, "RMSprop")
register_optimizer("adagrad", torch.optim.Adagrad, lambda cfg: {"eps": cfg.eps}, "Adagrad")
register_optimizer("nadam", torch.optim.NAdam, _decoupled, "NAdam (Nesterov Adam)")
register_optimizer("radam", torch.optim.RAdam, _decoupled, "RAdam (rectified Adam)")
# adafactor: lr and weight_decay only; beta2_decay, eps=(None, 1e-3) and d stay torch's defaults
register_optimizer("adafactor", torch.optim.Adafactor, lambda cfg: {}, "Adafactor (factored second moments)")


def check(cfg) -> None:
    """Range checks of the optimizer section."""
    checks = SectionChecks(cfg, "optimizer")
    checks.one_of("name", OPTIMIZERS.names())
    checks.positive("lr", "eps", "reference_batch_size", "alpha")
    checks.positive("weight_decay", "momentum", allow_zero=True)
    checks.unit("momentum", closed=True)
    betas = list(cfg.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        checks.fail("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.nesterov and cfg.name == "sgd" and cfg.momentum == 0:
        checks.fail("nesterov", "Nesterov needs optimizer.momentum > 0")


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


def _multipliers(cfg) -> Dict[str, float]:
    raw = getattr(cfg, "lr_multipliers", None) or {}
    out = {}
    for pattern, factor in raw.items():
        try:
            f = float(factor)
        except (TypeError, ValueError):
            f = float("nan")
        if not math.isfinite(f) or f < 0:
            raise ConfigError(f"optimizer.lr_multipliers[{pattern!r}]={factor!r}: must be a finite number >= 0 "
                              "(the factor on the LR of the parameters whose names match the glob)")
        out[str(pattern)] = f
    return out


def match_multiplier(name: str, multipliers: Dict[str, float]) -> Optional[str]:
    """The first pattern (in config order) whose fnmatch glob matches the parameter name, or None."""
    for pattern in multipliers:
        if fnmatchcase(name, pattern):
            return pattern
    return None


def param_groups(model: nn.Module, cfg, layers: Optional[Dict[str, Any]] = None,
                 only: Optional[set] = None) -> List[Dict]:
    """The trainable parameters (or those named in `only`) split into groups by (decayed?, lr_multipliers pattern,
    LR layer). `layers`: parameter name -> its LR layer from finetune (a layer id under layer-wise decay, "head"
    with finetune.head_lr); the group records it as `lr_layer`, and apply_hparams scales its LR by it."""
    layers = layers or {}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (only is None or n in only)]
    names = [n for n, _ in params]
    mults = _multipliers(cfg)
    for pattern in mults if only is None else ():
        if not any(fnmatchcase(n, pattern) for n in names):
            examples = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"optimizer.lr_multipliers: pattern {pattern!r} matches no parameter; parameter "
                              f"names look like {examples} (fnmatch globs, e.g. 'fc.*')")
    # The split does not depend on the decay (or multiplier) value, so a resume may change them freely.
    skip = no_decay_names(model) if cfg.no_decay_norm_bias else set()
    groups: Dict[tuple, Dict] = {}
    for n, p in params:
        decay, pattern, layer = n not in skip, match_multiplier(n, mults), layers.get(n)
        key = (decay, pattern, str(layer))
        if key not in groups:
            base = "all" if not cfg.no_decay_norm_bias else ("decay" if decay else "no_decay")
            suffix = "" if pattern is None else f"[{pattern}]"
            suffix += "" if layer is None else f"[layer {layer}]"
            groups[key] = {"params": [], "name": base + suffix, "decay": decay, "lr_pattern": pattern,
                           "lr_mult": 1.0 if pattern is None else mults[pattern]}
            if layer is not None:  # only then: a run without finetune keeps its checkpoint bytes
                groups[key]["lr_layer"] = layer
        groups[key]["params"].append(p)
    # Unscaled groups first (param_groups[0] is the one the logs and the run header show), decayed before
    # not decayed, then by LR layer from the top (the head) down, then in order of first appearance: stable
    # across runs of the same model and config.
    return sorted(groups.values(), key=lambda g: (g["lr_pattern"] is not None, _layer_order(g.get("lr_layer")),
                                                 not g["decay"]))


def _layer_order(layer: Any) -> tuple:
    if layer is None:
        return (0, 0)
    return (1, 0) if layer == "head" else (2, -int(layer))


def layer_lr_scales(layer_ids: Dict[str, int], num_layers: int, decay: Optional[float], head: List[str],
                    head_lr: Optional[float], lr: float) -> Tuple[Dict[str, Any], Dict[Any, float]]:
    """(parameter name -> LR layer, LR layer -> factor on the LR). Layer-wise decay as timm: layer i of L gets
    decay ** (L - 1 - i), the last layer (the head) 1. finetune.head_lr gives the head its own LR: head_lr / lr
    times the optimizer's LR (so it follows the schedule and the batch scaling like every group)."""
    layers: Dict[str, Any] = {}
    scales: Dict[Any, float] = {}
    if decay is not None:
        layers = {name: layer_ids.get(name, num_layers - 1) for name in layer_ids}
        scales = {i: decay ** (num_layers - 1 - i) for i in range(num_layers)}
    if head_lr is not None:
        layers.update({name: "head" for name in head})
        scales["head"] = head_lr / lr
    return layers, scales


def apply_hparams(optimizer: torch.optim.Optimizer, cfg, global_batch: int,
                  lr_scales: Optional[Dict[Any, float]] = None) -> None:
    """Write the config's hyperparameters into every group (also after loading a checkpoint's state).
    `lr_scales`: LR layer -> factor (layer_lr_scales); a group's LR is lr * its multiplier * its layer's factor."""
    lr = effective_lr(cfg, global_batch)
    mults = _multipliers(cfg)
    for g in optimizer.param_groups:
        pattern = g.get("lr_pattern")
        mult = mults.get(pattern, 1.0) if pattern is not None else 1.0
        layer = g.get("lr_layer")
        scale = (lr_scales or {}).get(layer, 1.0) if layer is not None else 1.0
        g["lr_mult"] = mult
        if layer is not None:
            g["lr_scale"] = scale
        g["base_lr"] = lr * mult * scale
        g["lr"] = lr * mult * scale
        g["weight_decay"] = cfg.weight_decay if g.get("decay", True) else 0.0
        g.update(OPTIMIZERS.get(cfg.name).hyperparameters(cfg))


def add_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module, cfg, names: set, global_batch: int,
                     layers: Optional[Dict[str, Any]] = None, lr_scales: Optional[Dict[Any, float]] = None,
                     label: str = "") -> int:
    """Gradual unfreezing: the parameters `names` (now trainable) join the optimizer as new groups, split and
    configured like the first ones. Returns the number of groups added."""
    groups = param_groups(model, cfg, layers, only=names)
    for g in groups:
        g["name"] += label
        optimizer.add_param_group(g)
    apply_hparams(optimizer, cfg, global_batch, lr_scales)
    return len(groups)


def build_optimizer(model: nn.Module, cfg, global_batch: int, layers: Optional[Dict[str, Any]] = None,
                    lr_scales: Optional[Dict[Any, float]] = None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, layers)
    if not groups:
        raise ConfigError("every parameter is frozen (finetune.freeze) and nothing is left to train; keep some "
                          "trainable with finetune.train (e.g. finetune.train=[@head]) or add LoRA adapters")
    lr = effective_lr(cfg, global_batch)
    factory = OPTIMIZERS.get(cfg.name)
    opt = factory.torch_class(groups, lr=lr, **factory.hyperparameters(cfg))
    apply_hparams(opt, cfg, global_batch, lr_scales)
    return opt
