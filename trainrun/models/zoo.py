"""The torchvision and timm model zoos by name: `model=torchvision model.arch=NAME`, `model=timm model.arch=NAME`.

The factories build the architecture only (random init, nothing downloaded; they also build on the meta device),
with the head sized for the data's classes and the stem for its channels. Starting weights are trainrun/models/
weights.py's job, after the build.
"""
from __future__ import annotations

import difflib
import importlib.util
from typing import List

import torch.nn as nn
import torch.nn.functional as F

from trainrun.errors import ConfigError

ZOOS = ("torchvision", "timm")
TIMM_EXTRA = "pip install 'trainrun[timm]'"


class DropoutLinear(nn.Linear):
    """A Linear head with dropout on its input. A subclass rather than Sequential(Dropout, Linear) so the head's
    parameters keep their names (fc.weight), which is what a pretrained file and head_of expect."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.p = p

    def forward(self, x):
        return super().forward(F.dropout(x, self.p, self.training))


def torchvision_names() -> List[str]:
    """The torchvision classification models (get_model also knows detection/segmentation/video ones)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def timm_names() -> List[str]:
    import timm

    return list(timm.list_models())


def zoo_names(zoo: str) -> List[str]:
    return torchvision_names() if zoo == "torchvision" else timm_names()


def listing_hint() -> str:
    """How to list the zoos' architectures (trainrun-models prints it under its table)."""
    return ("zoo models: model=torchvision model.arch=NAME or model=timm model.arch=NAME; list the names with "
            "`trainrun-models torchvision` / `trainrun-models timm` (or python -c \"import torchvision; "
            "print(torchvision.models.list_models(module=torchvision.models))\" / python -c \"import timm; "
            "print(timm.list_models())\")")


def _module_parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr


def _replace_input_conv(model: nn.Module, channels: int) -> None:
    """The first Conv2d that takes RGB, rebuilt for `channels` inputs with every other argument the same, at the
    same path (so a pretrained file's stem tensor still maps to it, adapted by weights.py)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups, module.bias is not None, module.padding_mode,
                             device=module.weight.device, dtype=module.weight.dtype)
            parent, attr = _module_parent(model, name)
            setattr(parent, attr, conv)
            return
    raise ConfigError(f"model.arch={type(model).__name__}: found no 3-channel input convolution to adapt to "
                      f"{channels}-channel inputs; use 3-channel data or another arch")


def _small_input_stem(model: nn.Module, channels: int) -> None:
    """The CIFAR-style ResNet stem (as trainrun/models/resnet.py): 3x3 stride-1 first conv, no max-pool."""
    first = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]  # timm deep stems: Sequential
    conv = nn.Conv2d(channels, first.out_channels, 3, stride=1, padding=1, bias=False,
                     device=first.weight.device, dtype=first.weight.dtype)
    if isinstance(model.conv1, nn.Conv2d):
        model.conv1 = conv
    else:
        model.conv1[0] = conv
    model.maxpool = nn.Identity()


def _refuse_small_input(arch: str, zoo: str) -> None:
    raise ConfigError(f"model.small_input=true: applies to ResNet-family archs only (model=torchvision/timm "
                      f"model.arch=resnet18, resnet50, ...), not model={zoo} model.arch={arch}; set "
                      "model.small_input=false")


def torchvision_model(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """Any torchvision classification model by model.arch (torchvision.models.get_model), head fit to the data."""
    import torchvision

    channels = input_shape[0]
    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=num_classes)
    if cfg.small_input:
        if not isinstance(model, torchvision.models.ResNet):
            _refuse_small_input(cfg.arch, "torchvision")
        _small_input_stem(model, channels)
    elif channels != 3:
        _replace_input_conv(model, channels)
    if dropout > 0:
        head = head_of(model)
        parent, attr = _module_parent(model, head)
        setattr(parent, attr, DropoutLinear(getattr(parent, attr), dropout))
    return model


def timm_model(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """Any timm model by model.arch (timm.create_model; the optional extra trainrun[timm]), head fit to the data."""
    import timm
    from timm.models.resnet import ResNet

    channels = input_shape[0]
    model = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, in_chans=channels,
                              drop_rate=dropout)
    if cfg.small_input:
        if not isinstance(model, ResNet):
            _refuse_small_input(cfg.arch, "timm")
        _small_input_stem(model, channels)
    return model


torchvision_model.config_keys = timm_model.config_keys = (  # the model.* keys they read
    "arch", "small_input", "dropout", "pretrained", "weights", "weights_strict")


def head_of(model: nn.Module) -> str:
    """The module name of the classifier: timm's get_classifier(), else the last nn.Linear (the last Conv2d for
    all-convolutional classifiers such as SqueezeNet)."""
    modules = list(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        for name, module in modules:
            if module is classifier and name:
                return name
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in modules if isinstance(module, kind) and name]
        if names:
            return names[-1]
    raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to call its head")


def _known_arch(zoo: str, arch: str) -> bool:
    if zoo == "timm":
        import timm

        if "." in arch:  # a pretrained tag (resnet18.a1_in1k): the tag must exist too
            return arch in timm.list_pretrained(arch.split(".")[0] + ".*")
        return timm.is_model(arch)
    return arch in torchvision_names()


def check(cfg) -> None:
    """The zoo rules of the model section (called from trainrun.models.check)."""
    zoo = cfg.get("name") if not cfg.get("_target_") else None
    if cfg.get("pretrained") and zoo not in ZOOS:
        what = f"model._target_={cfg._target_}" if cfg.get("_target_") else f"model.name={zoo}"
        raise ConfigError(f"model.pretrained=true: pretrained is for model=torchvision/timm (the zoos' own "
                          f"weights), not {what}; use model.weights=PATH for your own weights")
    if cfg.get("pretrained") and cfg.get("weights"):
        raise ConfigError(f"model.weights={cfg.weights}: model.pretrained=true already sets the starting weights; "
                          "use one of them")
    if zoo not in ZOOS:
        if cfg.get("arch") and not cfg.get("_target_"):
            raise ConfigError(f"model.arch={cfg.arch}: applies to model=torchvision/timm, not model.name={zoo}; "
                              f"use model={ZOOS[0]} model.arch={cfg.arch} (or drop model.arch)")
        return
    if zoo == "timm" and importlib.util.find_spec("timm") is None:
        raise ConfigError(f"model=timm: timm is not installed; {TIMM_EXTRA}")
    arch = cfg.get("arch") or ""
    if not arch:
        raise ConfigError(f"model.arch='': model={zoo} needs the zoo's model name, e.g. model.arch=resnet18; "
                          f"`trainrun-models {zoo}` lists them")
    if not _known_arch(zoo, arch):
        close = difflib.get_close_matches(arch, zoo_names(zoo), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"model.arch={arch}: not a {zoo} classification model; {hint}trainrun-models lists "
                          f"how to see all (`trainrun-models {zoo}`)")
