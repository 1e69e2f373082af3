"""Which parameters train: freezing by glob, gradual unfreezing, BatchNorm of frozen parts held in eval mode,
layer-wise LR decay with timm's semantics, and LoRA adapters (peft).

Names. `finetune.freeze`, `train` and `unfreeze_at` are fnmatch globs over parameter names as the model has them
after LoRA injection (a LoRA-wrapped `fc` has `fc.base_layer.weight`, `fc.lora_A.default.weight`, ...); the token
`@head` stands for the classifier's parameters (`head_names`). `lora_targets` are globs over module names.

Order (`Finetuner.prepare`, once, on the CPU, after the weights are loaded and before the optimizer and DDP):
LoRA injection (base frozen, adapters and head trainable) -> `freeze` minus `train` -> every pending unfreeze stage
frozen -> BatchNorm modules whose parameters are all frozen held in eval mode. Frozen means requires_grad=False;
the optimizer leaves such parameters out, and each unfreeze stage later joins it as new groups.

Layer-wise LR decay (`layer_ids`, `layer_scale`): a timm model is grouped exactly as
timm.optim.param_groups_layer_decay groups it. Any other model falls back to this rule: walk the top-level children
in order, expanding an nn.Sequential / nn.ModuleList child one level; each child holding parameters is one layer,
except that a normalisation module joins the layer before it; parameters registered on the root module itself
(class tokens, position embeddings) join the first layer, as in timm's stem group; the head is the last layer.
Layer i of L gets the LR factor decay ** (L - 1 - i); a parameter missing from the map gets the last layer (timm).

LoRA through peft's `inject_adapter_in_model`: the chosen module names are passed to peft as one anchored regex
(a list of names would also match every module whose name merely ends in `.NAME`: `0` would catch `layer1.0`).
Only nn.Linear and nn.Conv2d are adapted, and only where peft's adapter is exact and mergeable: not the head, not
the output projection of an nn.MultiheadAttention (its forward reads the weight directly, bypassing any wrapper),
not grouped, dilated or non-zero-padded convolutions. `merge_lora` folds the adapters back for export.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch.nn as nn

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError

HEAD = "@head"
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
          *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_LORA_TYPES = (nn.Linear, nn.Conv2d)
Stage = Tuple[int, List[str]]  # (the optimizer step from which it trains, its parameter names in model order)


def check(cfg) -> None:
    """Range checks of the finetune section (the globs are checked against the model in Finetuner.prepare)."""
    checks = SectionChecks(cfg, "finetune")
    checks.one_of("unfreeze_unit", ("epoch", "step"))
    decay = checks.value("layer_decay")
    if decay is not None and not 0 < decay <= 1:
        checks.fail("layer_decay", "must be in (0, 1]: layer i of L trains at lr * layer_decay ** (L - 1 - i), "
                                   "e.g. 0.75 (1: no decay)")
    checks.positive("head_lr", "lora_alpha")
    checks.positive("lora_rank", allow_zero=True)
    checks.unit("lora_dropout")
    if checks.value("lora_targets") and not checks.value("lora_rank"):
        checks.fail("lora_targets", "LoRA is off (finetune.lora_rank=0); set finetune.lora_rank (e.g. 8) to adapt "
                                    "these modules, or drop finetune.lora_targets")
    unit = checks.value("unfreeze_unit")
    for pattern, at in (checks.value("unfreeze_at") or {}).items():
        if isinstance(at, bool) or not isinstance(at, int) or at < 1:
            raise ConfigError(f"finetune.unfreeze_at[{pattern!r}]={at!r}: must be a whole number >= 1, the {unit} "
                              f"from which those parameters train (trainable from the start: leave them out of "
                              "finetune.freeze instead)")


# ---------------------------------------------------------------------------------------------------------- names

def _is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer, recognised by shape so that models without LoRA never import peft (seconds)."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "get_base_layer")


def _named_modules_outside_adapters(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """named_modules without what lives inside a LoRA layer (its base layer and its lora_A/lora_B Linears)."""
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        out.append((name, module))
        if name and _is_lora_layer(module):
            inside.append(name)
    return out


def _head_modules(model: nn.Module) -> List[str]:
    if hasattr(model, "get_classifier"):  # timm
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else [heads]
        ids = {id(h) for h in heads if isinstance(h, nn.Module)}
        return [name for name, module in model.named_modules() if id(module) in ids]
    modules = _named_modules_outside_adapters(model)
    for kinds in ((nn.Linear,), (nn.modules.conv._ConvNd,)):  # a conv head: squeezenet's classifier.1
        last = [name for name, module in modules if isinstance(module, kinds) and name]
        if last:
            return [last[-1]]
    return []


def head_names(model: nn.Module) -> List[str]:
    """Parameter names of the classifier, in model order: for a timm model the module get_classifier() returns,
    else the last nn.Linear in named_modules order (else the last convolution), adapters' insides not counted."""
    prefixes = tuple(name + "." for name in _head_modules(model))
    return [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]


def _examples(names: Sequence[str]) -> str:
    names = list(names)
    if len(names) <= 6:
        return ", ".join(names)
    return ", ".join(names[:3]) + ", ..., " + ", ".join(names[-2:])


def expand(patterns: Iterable[str], names: Iterable[str], head: Iterable[str], key: str) -> Set[str]:
    """The names that the globs (and '@head') match; a pattern that matches nothing is a ConfigError naming it."""
    names, head = list(names), set(head)
    out: Set[str] = set()
    for pattern in patterns:
        pattern = str(pattern)
        if pattern == HEAD:
            matched = [n for n in names if n in head]
            if not matched:
                raise ConfigError(f"{key}: {HEAD!r} names the classifier, but trainrun finds no classifier in this "
                                  f"model (no get_classifier(), no nn.Linear); name its parameters by glob instead; "
                                  f"parameter names look like {_examples(names)}")
        else:
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                raise ConfigError(f"{key}: pattern {pattern!r} matches no parameter; parameter names look like "
                                  f"{_examples(names)} (fnmatch globs, e.g. 'layer1.*'; {HEAD!r}: the classifier)")
        out.update(matched)
    return out


# ------------------------------------------------------------------------------------------------ layer-wise decay

def layer_scale(layer_id: int, num_layers: int, decay: float) -> float:
    """timm's factor on the LR of layer `layer_id` of `num_layers` (the last layer, the head, gets 1)."""
    return decay ** (num_layers - 1 - layer_id)


def layer_ids(model: nn.Module) -> Tuple[Dict[str, int], int]:
    """(parameter name -> layer id, number of layers) for layer-wise LR decay; every parameter is in the map."""
    if hasattr(model, "group_matcher"):  # timm, as param_groups_layer_decay
        from timm.models import group_parameters

        ids = dict(group_parameters(model, model.group_matcher(coarse=False), reverse=True))
    elif hasattr(model, "pretrained_cfg"):  # a timm model without a matcher: timm's own fallback
        from timm.optim._param_groups import auto_group_layers

        ids = dict(auto_group_layers(model))
    else:
        ids = _children_layer_ids(model)
    num_layers = max(ids.values(), default=0) + 1
    return {n: ids.get(n, num_layers - 1) for n, _ in model.named_parameters()}, num_layers


def lr_scales(model: nn.Module, decay: float) -> Dict[str, float]:
    """Parameter name -> its layer-wise LR factor."""
    ids, num_layers = layer_ids(model)
    return {name: layer_scale(layer, num_layers, decay) for name, layer in ids.items()}


def _layer_units(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            units.append((name, child))
    return units


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def _children_layer_ids(model: nn.Module) -> Dict[str, int]:
    """The fallback grouping of the module docstring."""
    known = {n for n, _ in model.named_parameters()}
    head = set(head_names(model))
    ids: Dict[str, int] = {}
    layer = -1
    for name, unit in _layer_units(model):
        names = [n for n, _ in unit.named_parameters(prefix=name) if n in known and n not in head and n not in ids]
        if not names:
            continue
        if not (_is_norm(unit) and layer >= 0):
            layer += 1
        ids.update({n: layer for n in names})
    root = [n for n, _ in model.named_parameters(recurse=False) if n not in head]
    ids.update({n: 0 for n in root})
    head_layer = max(layer + 1, 1 if root else 0)
    ids.update({n: head_layer for n in head})
    return ids


# ------------------------------------------------------------------------------------------------------------ LoRA

def _lora_refusal(name: str, module: nn.Module, head_modules: Set[str], attention_outputs: Set[str]) -> Optional[str]:
    """Why peft's LoRA cannot adapt this Linear/Conv2d exactly and mergeably, or None if it can."""
    if name in head_modules:
        return "is the classifier head, which trains in full"
    if name in attention_outputs:
        return ("is the output projection of an nn.MultiheadAttention, whose forward reads its weight directly "
                "(an adapter there would never run)")
    if isinstance(module, nn.Conv2d):
        if module.groups > 1:
            return f"is a grouped convolution (groups={module.groups}), whose adapter peft cannot merge"
        if tuple(module.dilation) != (1, 1):
            return f"is a dilated convolution (dilation={tuple(module.dilation)}), which peft's adapter ignores"
        if module.padding_mode != "zeros":
            return f"pads with {module.padding_mode!r}, which peft's adapter does not (it pads with zeros)"
    return None


def lora_candidates(model: nn.Module) -> Dict[str, Optional[str]]:
    """Every nn.Linear / nn.Conv2d module name -> None if LoRA may adapt it, else the reason it may not."""
    head_modules = set(_head_modules(model))
    attention_outputs = {f"{name}.out_proj" if name else "out_proj" for name, module in model.named_modules()
                         if isinstance(module, nn.MultiheadAttention)}
    return {name: _lora_refusal(name, module, head_modules, attention_outputs)
            for name, module in _named_modules_outside_adapters(model)
            if name and isinstance(module, _LORA_TYPES) and not _is_lora_layer(module)}


def lora_targets(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Module names (model order) the globs choose among the adaptable ones; []: every adaptable one."""
    candidates = lora_candidates(model)
    allowed = [name for name, refusal in candidates.items() if refusal is None]
    if not patterns:
        if not allowed:
            raise ConfigError("finetune.lora_rank: this model has no nn.Linear or nn.Conv2d outside its classifier "
                              "that LoRA can adapt; fine-tune it with finetune.freeze / finetune.train instead")
        return allowed
    chosen: Set[str] = set()
    for pattern in map(str, patterns):
        hits = [name for name in allowed if fnmatchcase(name, pattern)]
        if not hits:
            refused = [(name, why) for name, why in candidates.items() if why and fnmatchcase(name, pattern)]
            if refused:
                others = f"adaptable modules look like {_examples(allowed)}" if allowed else \
                    "this model has no module LoRA can adapt"
                raise ConfigError(f"finetune.lora_targets: pattern {pattern!r} matches only {refused[0][0]}, which "
                                  f"{refused[0][1]}; {others}")
            raise ConfigError(f"finetune.lora_targets: pattern {pattern!r} matches no nn.Linear or nn.Conv2d module; "
                              f"adaptable module names look like {_examples(allowed)} (fnmatch globs over module "
                              "names; [] adapts every one)")
        chosen.update(hits)
    return [name for name in allowed if name in chosen]


def inject_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    """Wrap the target modules in peft LoRA layers (lora_A drawn from torch's RNG, lora_B zero: the output is the
    base model's until the first step). peft freezes every parameter but the adapters'."""
    from peft import LoraConfig, inject_adapter_in_model

    regex = "(?:" + "|".join(re.escape(name) for name in targets) + ")"  # peft full-matches a str target
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=regex)
    inject_adapter_in_model(config, model)


def lora_names(model: nn.Module) -> List[str]:
    """Parameter names of the LoRA adapters (not of the base layers they wrap), in model order."""
    names = []
    for name, module in model.named_modules():
        if _is_lora_layer(module):
            names += [n for n, _ in module.named_parameters(prefix=name)
                      if not n.startswith(f"{name}.base_layer." if name else "base_layer.")]
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain base module back in its place, so the
    state_dict keys are the original model's (export). In place; returns the model."""
    layers = [(name, module) for name, module in model.named_modules() if name and _is_lora_layer(module)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if "peft_config" in vars(model):
        del model.peft_config
    return model


# ----------------------------------------------------------------------------------------------------- BatchNorm

class _HeldInEval:
    """Stands in for a BatchNorm instance's train(): whatever mode the loop asks for, the module stays in eval mode,
    so its running statistics stay those of the pretrained weights. A class, not a closure: the model can still be
    deep-copied (EMA) and pickled."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def _hold_in_eval(module: nn.Module) -> None:
    module.train = _HeldInEval(module)
    module.train(False)


def _release(module: nn.Module, training: bool) -> None:
    del module.train
    module.train(training)


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


# ----------------------------------------------------------------------------------------------------- Finetuner

class Finetuner:
    """Applies one finetune section to one model: `prepare()` once in build, then `due(step)` / `unfreeze(stage)`
    from the loop (and on resume, before the optimizer state is loaded)."""

    def __init__(self, cfg, model: nn.Module, steps_per_epoch: int):
        self.cfg = cfg  # the finetune section
        self.model = model
        self.steps_per_epoch = int(steps_per_epoch)
        self.head: List[str] = head_names(model)  # before LoRA: the head is never wrapped, its names stay
        self.lora_modules: List[str] = []
        self.stages: List[Stage] = []
        self._applied: Set[int] = set()
        self._held: Dict[str, nn.Module] = {}

    def prepare(self) -> None:
        cfg = self.cfg
        if cfg.lora_rank > 0:
            self.lora_modules = lora_targets(self.model, list(cfg.lora_targets))
            inject_lora(self.model, self.lora_modules, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            self._set_trainable(self.head, True)  # a new head for the data: it trains in full
        names = [n for n, _ in self.model.named_parameters()]
        frozen = expand(cfg.freeze, names, self.head, "finetune.freeze")
        kept = expand(cfg.train, names, self.head, "finetune.train")
        self._set_trainable(frozen - kept, False)
        self._set_trainable(kept, True)
        if cfg.lora_rank > 0:
            kept |= set(self.head) | {n for n in names if ".lora_" in n}
        # a stage holds what its glob matches minus what `train` keeps training from the start (gradual's
        # freeze ['*'], train ['@head'], unfreeze_at {'*': 3}: the head trains throughout, the rest from epoch 3)
        self.stages = self._build_stages(names, kept)
        for _, stage_names in self.stages:
            self._set_trainable(stage_names, False)
        if cfg.freeze_bn:
            self._hold_frozen_batchnorm()

    def _build_stages(self, names: List[str], kept: Set[str]) -> List[Stage]:
        unit = self.cfg.unfreeze_unit
        if self.cfg.unfreeze_at and unit == "epoch" and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={self.steps_per_epoch}: unfreezing by epoch needs >= 1")
        per_unit = self.steps_per_epoch if unit == "epoch" else 1
        by_step: Dict[int, Set[str]] = {}
        claimed: Set[str] = set()  # a parameter several globs match starts training at the earliest of them
        for pattern, at in sorted(self.cfg.unfreeze_at.items(), key=lambda item: item[1]):
            matched = expand([pattern], names, self.head, "finetune.unfreeze_at") - claimed - kept
            claimed |= matched
            by_step.setdefault(int(at) * per_unit, set()).update(matched)
        return [(step, [n for n in names if n in members]) for step, members in sorted(by_step.items()) if members]

    def _set_trainable(self, names: Iterable[str], trainable: bool) -> None:
        names = set(names)
        for name, param in self.model.named_parameters():
            if name in names:
                param.requires_grad_(trainable)

    def _hold_frozen_batchnorm(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, _BATCHNORMS) and _all_frozen(module) and name not in self._held:
                _hold_in_eval(module)
                self._held[name] = module

    def _release_trainable_batchnorm(self) -> None:
        for name, module in list(self._held.items()):
            if not _all_frozen(module):
                _release(module, self.model.training)
                del self._held[name]

    def held_batchnorm(self) -> List[str]:
        """Names of the BatchNorm modules now held in eval mode."""
        return list(self._held)

    def due(self, step: int) -> List[Stage]:
        """The stages not yet applied whose threshold the trainer's step (optimizer steps done) has reached."""
        return [stage for stage in self.stages if stage[0] <= step and stage[0] not in self._applied]

    def unfreeze(self, stage: Stage) -> List[nn.Parameter]:
        """Make the stage's parameters trainable; returns those that were frozen, in model order."""
        members = set(stage[1])
        newly = []
        for name, param in self.model.named_parameters():
            if name in members and not param.requires_grad:
                param.requires_grad_(True)
                newly.append(param)
        self._applied.add(stage[0])
        self._release_trainable_batchnorm()
        return newly

    def summary(self) -> Dict[str, int]:
        """Parameter counts: trainable now, total, frozen now, and LoRA adapters'."""
        params = dict(self.model.named_parameters())
        total = sum(p.numel() for p in params.values())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        lora = sum(params[n].numel() for n in lora_names(self.model))
        return {"trainable": trainable, "total": total, "frozen": total - trainable, "lora": lora}
