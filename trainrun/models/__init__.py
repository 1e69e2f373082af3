"""Model registry: name -> factory(model_cfg, input_shape, num_classes, dropout) -> nn.Module."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch.nn as nn

from trainrun.checks import SectionChecks
from trainrun.errors import ConfigError
from trainrun.models import hf, zoo
from trainrun.models.gpt import check_shape as check_gpt, gpt
from trainrun.models.resnet import resnet18, resnet50
from trainrun.models.small import cnn, mlp
from trainrun.models.vit import vit
from trainrun.registry import Registry

MODELS = Registry("model.name")  # name -> factory(model_cfg, input_shape, num_classes, dropout) -> nn.Module
for _name, _factory in (("mlp", mlp), ("cnn", cnn), ("resnet18", resnet18), ("resnet50", resnet50), ("vit", vit),
                        ("torchvision", zoo.torchvision_model), ("timm", zoo.timm_model), ("gpt", gpt),
                        ("hf_causal_lm", hf.hf_causal_lm)):
    MODELS.register(_name, _factory)


def build_model(cfg, input_shape: Tuple[int, int, int], num_classes: int, dropout: float,
                num_outputs: Optional[int] = None) -> nn.Module:
    """A registered model by `model.name`, or the user's `model._target_` factory, which gets its own keys plus
    `input_shape`, `num_classes` and `num_outputs` (what the task needs per sample) if its signature names them."""
    if cfg.get("_target_"):
        from trainrun import usercode
        from trainrun.config import ModelConfig

        offered = {"input_shape": tuple(input_shape), "num_classes": num_classes,
                   "num_outputs": num_outputs if num_outputs is not None else num_classes}
        model = usercode.call_factory(cfg, "model._target_", usercode.schema_defaults(ModelConfig), offered)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model._target_={cfg._target_} returned a {type(model).__name__}, not a "
                              "torch.nn.Module; return the model itself")
        return model
    return MODELS.get(cfg.name)(cfg, tuple(input_shape), num_classes, dropout)


def model_label(cfg) -> str:
    """How errors and the run header name the model: `model.name=cnn` or `model._target_=pkg.Net`."""
    return f"model._target_={cfg._target_}" if cfg.get("_target_") else f"model.name={cfg.name}"


def describe_models() -> Dict[str, str]:
    return MODELS.describe()


def check(cfg) -> None:
    """Range checks of the model section."""
    checks = SectionChecks(cfg, "model")
    if cfg.get("name") == "hf_causal_lm" and not cfg.get("_target_"):
        hf.check(cfg)  # model.arch names a transformers model_type here, not a zoo model
    else:
        zoo.check(cfg)
    if cfg.get("_target_"):
        return  # user code: its arguments are checked when the factory is called, before any compute
    checks.one_of("name", sorted(MODELS))
    checks.one_of("activation", ("relu", "gelu", "tanh", "silu"))
    checks.positive("patch_size", "width", "layers", "heads", "mlp_ratio")
    checks.positive("depth", allow_zero=True)
    checks.unit("dropout")
    if cfg.name == "gpt":
        check_gpt(cfg)  # after the positive checks: it divides by model.heads
    for key in ("hidden_sizes", "channels"):
        if any(width <= 0 for width in checks.value(key)):
            checks.fail(key, "every layer width must be > 0 (a zero-width layer passes nothing on, so the model "
                             "cannot learn); drop the 0 or use a positive width")


def model_options(option_dir: Path) -> Dict[str, str]:
    """What `model=NAME` accepts, i.e. the option files in configs/model/ -> what each builds: its registry model's
    description, then the option file's own header comment (vit_tiny: the ViT factory at ViT-Tiny sizes)."""
    from omegaconf import OmegaConf

    out = {}
    for path in sorted(Path(option_dir).glob("*.yaml")):
        lines = path.read_text().splitlines()
        header = " ".join(l.lstrip("#").strip() for l in itertools.takewhile(lambda l: l.startswith("#"), lines))
        name = OmegaConf.load(path).get("name")
        doc = MODELS.describe()[name] if name in MODELS else ""
        out[path.stem] = " ".join(part for part in (doc, header) if part)
    return out


def check_forward(model: nn.Module, name: str, input_shape: Sequence[int], num_classes: int, task=None,
                  dtype=None) -> None:
    """Run the built model once on one all-zero sample (eval mode, no grad: no RNG drawn, no BatchNorm statistics
    changed) and check its output is [1, num_classes], so a model that cannot take this input fails in one line
    before any training instead of a traceback at the first step. `dtype`: the inputs' (token ids: int64)."""
    import torch

    shape = list(input_shape)
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(f"{_label(name)}: parameter {empty[0]} has zero size on inputs of shape {shape}: a "
                          "zero-width layer passes nothing on; give every layer and the input a positive size")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape, dtype=dtype))
    except Exception as e:  # noqa: BLE001  (any failure of the forward is the same finding)
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ConfigError(f"{_label(name)} cannot run on inputs of shape {shape} ({type(e).__name__}: {last}); "
                          "use larger inputs (data.image_size / data.input_shape) or a model that fits them "
                          "(e.g. model=mlp)") from e
    finally:
        model.train(was_training)
    if task is not None and not task.classifies:
        task.check_output(out, _label(name))
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{_label(name)} on inputs of shape {shape} returns {got}, not [1, {num_classes}] "
                          "(one logit per class); " + ("give the model's last layer num_classes outputs (a factory "
                                                       "that names num_classes in its signature receives it)"
                                                       if "_target_" in _label(name) else
                                                       "the model's head does not fit data.num_classes"))


def _label(name: str) -> str:
    return name if "=" in name else f"model.name={name}"


def memory_bytes(device="cpu"):
    """The memory a model on `device` can use at most: the GPU's, or the machine's RAM (the cgroup limit when lower);
    None if unknown."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total


def check_model_size(cfg, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0, device="cpu",
                     what: str = "") -> int:
    """Refuse, before anything is allocated, a model whose weights alone exceed the memory of `device`: it is built
    on the meta device (no storage, no random numbers drawn) to count its parameters. Returns the count."""
    import torch

    with torch.device("meta"):
        model = build_model(cfg, tuple(input_shape), num_classes, dropout)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    available = memory_bytes(device)
    if available is not None and weight_bytes > available:
        where = "GPU" if torch.device(device).type == "cuda" else "machine"
        raise ConfigError(f"{what + ': ' if what else ''}model.name={cfg.name} with {num_classes:,} classes on "
                          f"inputs {list(input_shape)} has {params:,} parameters, {weight_bytes / 2**30:,.1f} GiB "
                          f"of weights alone, more than this {where}'s {available / 2**30:,.1f} GiB of memory; "
                          "choose a smaller model or fewer classes (model.hidden_sizes / channels / width, "
                          "data.num_classes)")
    return params
