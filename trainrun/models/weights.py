"""Starting weights: the zoos' pretrained files (from their local caches, never downloaded) or `model.weights=PATH`
(a trainrun run/checkpoint, a .pt/.pth state_dict, a .safetensors file), loaded into a freshly built model by name,
with a report of what did not fit and the file's SHA256 for meta.json."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from trainrun.errors import ConfigError, TrainrunError
from trainrun.usercode import sha256_of

log = logging.getLogger("trainrun")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader looks for, in its order


def load_initial_weights(model: nn.Module, model_cfg, input_channels: int) -> Optional[Dict[str, Any]]:
    """Load the configured starting weights into `model` (on the CPU, after its init, before LoRA/freezing).
    Returns the provenance for meta.json, or None when neither model.pretrained nor model.weights is set."""
    if model_cfg.get("pretrained"):
        zoo = model_cfg.get("name")
        source, path = torchvision_file(model_cfg.arch) if zoo == "torchvision" else timm_file(model_cfg.arch)
        state = read_state_dict(path, "model.pretrained")
        key = f"model.pretrained (model={zoo} model.arch={model_cfg.arch})"
        sha = sha256_of(path)
        _check_official_hash(path, sha)
    elif model_cfg.get("weights"):
        spec = str(model_cfg.weights)
        state, path, sha = read_weights(spec)
        source, key = spec, f"model.weights={spec}"
    else:
        return None
    report = apply_state_dict(model, state, input_channels, key, bool(model_cfg.get("weights_strict")))
    loaded = report.pop("loaded")
    provenance = {"source": source, "file": str(path), "sha256": sha, **report}
    _log_summary(model, provenance, key, loaded)
    return provenance


# ----------------------------------------------------------------------------------------------- the zoos' caches
def torchvision_file(arch: str) -> Tuple[str, Path]:
    """(source, path) of torchvision's DEFAULT weights of `arch` in torch hub's cache (TORCH_HOME)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"model.pretrained=true: torchvision has no pretrained weights for model.arch={arch}; "
                          "use model.pretrained=false or another arch") from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        fetch = (f"python -c \"import torchvision; torchvision.models.get_model_weights('{arch}').DEFAULT"
                 ".get_state_dict()\"")
        raise ConfigError(f"model.pretrained=true: no cached weights file {path} (torchvision {arch} "
                          f"{weights.name}; this machine does not download); on a connected machine run {fetch}, "
                          f"then copy ~/.cache/torch/hub/checkpoints/{path.name} to {path}")
    return f"torchvision:{arch}:{weights.name}", path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def timm_file(arch: str) -> Tuple[str, Path]:
    """(source, path) of the file timm's pretrained_cfg for `arch` names: in the Hugging Face cache (hf_hub_id) or,
    for url-only weights, in torch hub's cache."""
    from timm.models import get_pretrained_cfg

    try:
        pretrained = get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown tag: models.check names it first; this is the direct caller's error
        pretrained = None
    cfg = pretrained.to_dict() if pretrained is not None else {}
    name = f"{cfg.get('architecture', arch)}.{cfg['tag']}" if cfg.get("tag") else arch
    fetch = (f"on a connected machine run python -c \"import timm; timm.create_model('{name}', pretrained=True)\", "
             "then copy")
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        path = _hf_cached(repo, revision or None, cfg.get("hf_hub_filename"))
        if path is None:
            folder = "models--" + repo.replace("/", "--")
            want = cfg.get("hf_hub_filename") or HF_FILES[0]
            raise ConfigError(f"model.pretrained=true: no cached weights file {hf_cache_dir() / folder}/snapshots/"
                              f"<revision>/{want} (timm {name} from {repo}; refs/{revision or 'main'} names the "
                              f"revision; this machine does not download); {fetch} the folder ~/.cache/huggingface/"
                              f"hub/{folder} into {hf_cache_dir()}/")
        return f"timm:{name}", path
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if not path.is_file():
            raise ConfigError(f"model.pretrained=true: no cached weights file {path} (timm {name}; this machine "
                              f"does not download); {fetch} ~/.cache/torch/hub/checkpoints/{path.name} to {path}")
        return f"timm:{name}", path
    raise ConfigError(f"model.pretrained=true: timm has no pretrained weights for model.arch={arch}; use "
                      "model.pretrained=false or another arch (timm.list_pretrained() lists them)")


def _hf_cached(repo: str, revision: Optional[str], filename: Optional[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    for name in (filename,) if filename else HF_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=hf_cache_dir(), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _check_official_hash(path: Path, sha: str) -> None:
    """torch hub names its files NAME-<first hex digits of the SHA256>.pth: a file that differs was not the zoo's."""
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if match and not sha.startswith(match.group(1)):
        log.warning("model.pretrained: %s has SHA256 %s..., not the %s... its name records; it is not the file the "
                    "zoo published", path, sha[:12], match.group(1))


# ------------------------------------------------------------------------------------------------ model.weights
def read_weights(spec: str) -> Tuple[Dict[str, torch.Tensor], Path, str]:
    """(state_dict, file, sha256) of model.weights=PATH: a trainrun run or checkpoint dir (SHA256-verified), a
    .safetensors file, or a torch state_dict file (weights_only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_trainrun_checkpoint(spec, path)
    if not path.is_file():
        raise ConfigError(f"model.weights={spec}: no such file or directory; point it at a trainrun run or "
                          "checkpoint directory, a .pt/.pth state_dict or a .safetensors file")
    return read_state_dict(path, f"model.weights={spec}"), path, sha256_of(path)


def _read_trainrun_checkpoint(spec: str, path: Path) -> Tuple[Dict[str, torch.Tensor], Path, str]:
    from trainrun import checkpoint

    try:
        ckpt_dir = checkpoint.candidates(str(path), path, key="model.weights")[0]
        state, meta = checkpoint.load(ckpt_dir)
    except TrainrunError as e:
        raise ConfigError(str(e) if str(e).startswith("model.weights=") else f"model.weights={spec}: {e}") from e
    model_state = state.get("model") if isinstance(state, dict) else None
    return (_tensor_mapping(model_state, f"model.weights={spec}", ckpt_dir / checkpoint.STATE),
            ckpt_dir / checkpoint.STATE, meta.get("sha256") or sha256_of(ckpt_dir / checkpoint.STATE))


def read_state_dict(path: Path, key: str) -> Dict[str, torch.Tensor]:
    """A weights file as a name -> tensor mapping: safetensors, or torch.load(weights_only=True) of a state_dict
    (also inside a {"state_dict": ...} or {"model": ...} wrapper)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (every unreadable file is the same finding)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "nsupported" in line), lines[0]).rstrip(".")
        raise ConfigError(f"{key}: cannot read {path} as weights ({type(e).__name__}: {why[:200]}); give a "
                          ".pt/.pth state_dict (loaded with weights_only=True) or a .safetensors file") from e
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    return _tensor_mapping(obj, key, path)


def _tensor_mapping(obj: Any, key: str, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items()):
        raise ConfigError(f"{key}: {path} holds a {type(obj).__name__}, not a mapping of names to weight tensors "
                          "(a state_dict); give a model's state_dict file")
    return obj


# ----------------------------------------------------------------------------------------------------- matching
def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _input_conv_key(model: nn.Module, input_channels: int) -> Optional[str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == input_channels:
            return f"{name}.weight"
    return None


def _adapt_input_conv(weight: torch.Tensor, input_channels: int) -> torch.Tensor:
    """timm's rule: 1 channel sums the file's RGB kernels; more channels repeat them, scaled by 3/C."""
    try:
        from timm.models import adapt_input_conv
    except ImportError:
        adapt_input_conv = None
    if adapt_input_conv is not None:
        return adapt_input_conv(input_channels, weight, base_chans=weight.shape[1])
    dtype, weight = weight.dtype, weight.float()
    if input_channels == 1:
        return weight.sum(dim=1, keepdim=True).to(dtype)
    repeats = -(-input_channels // weight.shape[1])
    adapted = weight.repeat(1, repeats, 1, 1)[:, :input_channels]
    return (adapted * (weight.shape[1] / input_channels)).to(dtype)


def apply_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], input_channels: int, key: str,
                     strict: bool) -> Dict[str, Any]:
    """Load every tensor of `state` whose name and shape fit `model`; report the rest. The head's keys (head_of)
    that do not fit are expected (it was replaced for this data's classes)."""
    from trainrun.models.zoo import head_of

    own = model.state_dict()
    conv_key = _input_conv_key(model, input_channels)
    head = head_of(model) + "."
    loadable, unexpected, mismatched = {}, [], []
    for raw_name, tensor in state.items():
        name = _strip_prefixes(raw_name)
        if name not in own:
            unexpected.append(name)
            continue
        if name == conv_key and tensor.dim() == 4 and tensor.shape[0] == own[name].shape[0] \
                and tensor.shape[2:] == own[name].shape[2:] and tensor.shape[1] != own[name].shape[1]:
            tensor = _adapt_input_conv(tensor, input_channels)
        if tuple(tensor.shape) != tuple(own[name].shape):
            mismatched.append(f"{name} {list(tensor.shape)}->{list(own[name].shape)}")
            continue
        loadable[name] = tensor
    mismatched_names = {m.split(" ")[0] for m in mismatched}
    loaded_storage = {own[n].data_ptr() for n in loadable}  # a tied weight (GPT head = embedding) loads by any name
    missing = [n for n in own if n not in loadable and n not in mismatched_names
               and own[n].data_ptr() not in loaded_storage
               and not n.endswith("num_batches_tracked")]  # a counter, not a weight: BatchNorm starts it afresh
    if not loadable:
        raise ConfigError(f"{key}: the file fits nothing in this model: its names look like "
                          f"{', '.join(list(state)[:3])} vs the model's {', '.join(list(own)[:3])}; point it at "
                          "weights of this architecture")
    head_keys = [n for n in own if n.startswith(head) and (n in missing or n in mismatched_names)]
    missing = [n for n in missing if not n.startswith(head)]
    mismatched = [m for m in mismatched if not m.startswith(head)]
    if strict and (missing or unexpected or mismatched):
        problems = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected] + \
                   [f"shape {m}" for m in mismatched]
        raise ConfigError(f"model.weights_strict=true: {key} does not fit the model beyond its head: "
                          f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''} ({len(problems)} in all); "
                          "fix the weights or the model, or set model.weights_strict=false")
    model.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "head": head_keys,
            "loaded": len(loadable)}


def _log_summary(model: nn.Module, provenance: Dict[str, Any], key: str, loaded: int) -> None:
    from trainrun.models.zoo import head_of

    log.info("%s: loaded %d of the model's %d tensors from %s (sha256 %s)", key, loaded, len(model.state_dict()),
             provenance["file"], provenance["sha256"][:12])
    if provenance["head"]:
        head = model.get_submodule(head_of(model))
        classes = getattr(head, "out_features", getattr(head, "out_channels", "?"))
        log.info("%s: %s not loaded, expected: the head was replaced for %s classes", key,
                 ", ".join(provenance["head"]), classes)
    for kind in ("missing", "unexpected", "mismatched"):
        names: List[str] = provenance[kind]
        if names:
            log.warning("%s: %d %s keys (%s%s)", key, len(names), kind, ", ".join(names[:5]),
                        ", ..." if len(names) > 5 else "")
