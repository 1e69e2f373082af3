"""Weight initialisation schemes, applied after the model is built and before the optimizer sees it."""
from __future__ import annotations

import logging
import math
from typing import Dict, List

import torch
import torch.nn as nn

from trainrun.errors import ConfigError
from trainrun.registry import Registry

log = logging.getLogger("trainrun")

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_SYMMETRY = ("a constant initialisation gives every unit of a layer the same output and the same gradient, so the "
             "units stay identical forever (the symmetry problem); use init=kaiming_normal for ReLU nets or "
             "init=xavier_uniform for tanh/linear ones")

# Kaiming/orthogonal gain per activation f: g with g^2 * E[f(z)^2] = 1 for z ~ N(0, 1), the second-moment rule
# that gives ReLU its sqrt(2) (He et al. 2015, eq. 10) and keeps a unit pre-activation variance from layer to
# layer. torch's calculate_gain has no entry for GELU or SiLU; their E[f(z)^2] = 0.4252215 and 0.3557755 come from
# numerical integration against the normal density (checked by tests/test_hardening_correctness.py). Unlike
# ReLU they are not scale-invariant, so the gain holds at the unit-variance fixed point. tanh keeps torch's 5/3.
GAINS = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3, "gelu": 1.5335304411955353, "silu": 1.6765324703310909}


def gain(activation: str) -> float:
    return GAINS.get(activation, GAINS["relu"])


def _weighted_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def apply_init(model: nn.Module, cfg, activation: str = "relu", batch: torch.Tensor = None) -> nn.Module:
    """Re-initialise the model by `cfg.name`; `default` keeps torch's init.

    xavier_*/kaiming_*/orthogonal/trunc_normal re-draw Linear/Conv weights (biases 0); lsuv calibrates them on
    `batch` (needed; None for image-file datasets); gpt2 re-draws Linear/Embedding weights and resets norms.
    constant/zeros are refused (symmetry). zero_init_residual / zero_init_head apply after the scheme.
    """
    if cfg.name in ("constant", "zeros"):
        raise ConfigError(f"init.name={cfg.name!r}: {_SYMMETRY}")
    if cfg.name == "gpt2" and not any(getattr(m, "_residual_projection", False) for m in model.modules()):
        raise ConfigError("init=gpt2 scales the residual projections of transformer blocks, and this model has "
                          "none (model=vit_tiny, gpt and hf_causal_lm mark them); use one of those, or choose another "
                          "init (e.g. init=kaiming_normal)")
    if cfg.name == "lsuv" and batch is None:
        raise ConfigError("init=lsuv needs an in-memory dataset batch to measure layer outputs (data=digits, "
                          "mnist5k, synthetic or tensors); choose another init (e.g. init=kaiming_normal) for "
                          "image-file datasets")
    with torch.no_grad():
        scheme = INITS.get(cfg.name)
        if cfg.name in MODEL_SCHEMES:
            scheme(model, cfg, batch)
        else:
            for m in _weighted_layers(model):
                scheme(m.weight, cfg, activation)
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


def _kaiming(w: torch.Tensor, scheme: str, activation: str) -> None:
    """He init with fan_in: std = gain(activation) / sqrt(fan_in) (torch's own call where torch has the gain)."""
    fill = nn.init.kaiming_uniform_ if scheme == "kaiming_uniform" else nn.init.kaiming_normal_
    if activation in ("relu", "tanh"):
        fill(w, mode="fan_in", nonlinearity=activation)
    else:
        fill(w, mode="fan_in", nonlinearity="linear")  # gain 1, then the activation's own
        w.mul_(gain(activation))


class _StopForward(Exception):
    """Raised from a forward hook once the layer being calibrated has produced its output."""


def _forward_order(model: nn.Module, batch: torch.Tensor, layers: List[nn.Module]) -> List[nn.Module]:
    """`layers` in the order the forward pass first calls them (layers the forward never calls are left out)."""
    order: List[nn.Module] = []
    seen = set()

    def hook(mod, inp, out):
        if id(mod) not in seen:
            seen.add(id(mod))
            order.append(mod)

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_var(model: nn.Module, batch: torch.Tensor, layer: nn.Module) -> float:
    """Population variance of `layer`'s output on `batch`; the forward stops right after that layer."""
    got: Dict[str, float] = {}

    def hook(mod, inp, out):
        got["var"] = out.detach().double().var(unbiased=False).item()
        raise _StopForward

    h = layer.register_forward_hook(hook)
    try:
        model(batch)
    except _StopForward:
        pass
    finally:
        h.remove()
    return got["var"]


def lsuv_init(model: nn.Module, batch: torch.Tensor, target_var: float = 1.0, tol: float = 0.01,
              max_iters: int = 10) -> Dict[str, float]:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016).

    Orthogonal init of every Linear/Conv weight (biases 0), then, layer by layer in forward order, rescale the
    weight by sqrt(target / var) until the variance of that layer's output on `batch` is within `tol` of
    `target_var` (at most `max_iters` rescalings per layer). Runs in eval mode (dropout off, BatchNorm running
    statistics untouched) under no_grad and restores each module's train/eval flag. A BatchNorm after a conv
    renormalises in training anyway; the conv outputs are still scaled. Returns {layer name: final variance}.
    """
    layers = _weighted_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    flags = [(m, m.training) for m in model.modules()]
    ref = next(model.parameters(), None)
    if ref is not None:
        batch = batch.to(device=ref.device, dtype=ref.dtype if torch.is_floating_point(batch) else batch.dtype)
    result: Dict[str, float] = {}
    try:
        model.eval()
        with torch.no_grad():
            for m in layers:
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            for m in _forward_order(model, batch, layers):
                var = _output_var(model, batch, m)
                for _ in range(max_iters):
                    if abs(var - target_var) < tol or not math.isfinite(var) or var <= 0:
                        break
                    m.weight.mul_(math.sqrt(target_var / var))
                    var = _output_var(model, batch, m)
                if abs(var - target_var) >= tol:
                    log.warning("init=lsuv: layer %s reached output variance %.4g (target %g) after %d iterations",
                                names.get(id(m), type(m).__name__), var, target_var, max_iters)
                result[names.get(id(m), type(m).__name__)] = var
    finally:
        for mod, flag in flags:
            mod.training = flag
    return result


def gpt2_init(model: nn.Module, std: float = 0.02) -> int:
    """GPT-2 init: N(0, std) for every Linear/Embedding weight, biases 0, norms weight 1 / bias 0; the weights of
    modules marked `_residual_projection = True` get std / sqrt(2 N), N = model.num_layers if the model has it,
    else the number of marked modules. Returns N (0 when nothing is marked)."""
    marked = [m for m in model.modules() if getattr(m, "_residual_projection", False)]
    n_layers = int(getattr(model, "num_layers", 0) or len(marked))
    if not marked:
        log.warning("init=gpt2: no module carries _residual_projection=True; every weight uses std %g", std)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:  # q, k, v in one Parameter
            nn.init.normal_(m.in_proj_weight, mean=0.0, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, _NORMS) or "norm" in type(m).__name__.lower():
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    if marked and n_layers > 0:
        scaled = std / math.sqrt(2 * n_layers)
        for m in marked:
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                nn.init.normal_(w, mean=0.0, std=scaled)
            else:  # a marked container: its own Linear weights are the residual projection
                for sub in m.modules():
                    if isinstance(sub, nn.Linear):
                        nn.init.normal_(sub.weight, mean=0.0, std=scaled)
    return n_layers if marked else 0


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
        return gain(nonlinearity) / math.sqrt(fan_in)
    raise ValueError(scheme)


# init.name -> a scheme. Per-layer schemes re-draw each Linear/Conv weight (biases 0): fn(weight, cfg, activation);
# whole-model schemes (MODEL_SCHEMES) take fn(model, cfg, batch). constant / zeros are names only to be refused.
INITS = Registry("init.name")
INITS.register("default", lambda model, cfg, batch: None, doc="torch's own init of every layer")
INITS.register("xavier_uniform", lambda w, cfg, act: nn.init.xavier_uniform_(w))
INITS.register("xavier_normal", lambda w, cfg, act: nn.init.xavier_normal_(w))
INITS.register("kaiming_uniform", lambda w, cfg, act: _kaiming(w, "kaiming_uniform", act))
INITS.register("kaiming_normal", lambda w, cfg, act: _kaiming(w, "kaiming_normal", act))
INITS.register("orthogonal", lambda w, cfg, act: nn.init.orthogonal_(w, gain=gain(act)))
INITS.register("trunc_normal", lambda w, cfg, act: nn.init.trunc_normal_(w, std=cfg.std, a=-2 * cfg.std,
                                                                          b=2 * cfg.std))
INITS.register("lsuv", lambda model, cfg, batch: lsuv_init(model, batch, target_var=cfg.lsuv_target_var,
                                                           tol=cfg.lsuv_tol, max_iters=cfg.lsuv_max_iters))
INITS.register("gpt2", lambda model, cfg, batch: gpt2_init(model, std=cfg.std))
MODEL_SCHEMES = ("default", "lsuv", "gpt2")
REFUSED = ("constant", "zeros")  # accepted by the validator only to be refused with the symmetry explanation
