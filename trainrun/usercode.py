"""User code named by `_target_`: import it, call it with the right arguments, record where it came from, and the
trust rule for checkpoints (a stored config never makes trainrun import code the current command did not name).

Every failure is one ConfigError (DataError for a data factory's return value) naming the key, the target and the
fix, raised before any training compute.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from trainrun.errors import ConfigError, DataError

TARGET = "_target_"


def target_of(node: Any) -> Optional[str]:
    """The `_target_` of a config node (DictConfig or dict), else None (also for a node that is not a mapping)."""
    from omegaconf import DictConfig

    if isinstance(node, DictConfig):
        return node.get(TARGET) if TARGET in node else None
    if isinstance(node, dict):
        return node.get(TARGET)
    return None


def _target_key(key: str) -> str:
    """`model` or `model._target_` -> `model._target_`: messages name the key a user would set."""
    return key if key.endswith(TARGET) else f"{key}.{TARGET}"


def _exc_line(e: BaseException) -> str:
    """`ValueError: its first line` (just the type when the message is empty)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _is_missing_module(e: ModuleNotFoundError, module: str) -> bool:
    """The module itself (or a parent package of it) does not exist, as opposed to an import inside it failing."""
    return e.name is not None and (module == e.name or module.startswith(e.name + "."))


def _import_longest_module(parts, where: str):
    """(module, number of parts it covers): the longest importable module prefix of the dotted path. The error of
    the longest attempt is the informative one (`No module named 'mypkg'` or `... 'mypkg.nets'`)."""
    first_error = None
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        try:
            return importlib.import_module(name), n
        except ModuleNotFoundError as e:
            if not _is_missing_module(e, name):  # the module exists but imports something missing
                raise ConfigError(f"{where} cannot be imported ({_exc_line(e)}); install the missing package or fix "
                                  "the module's imports") from e
            first_error = first_error or e
        except Exception as e:  # noqa: BLE001  (a syntax error or any exception raised while importing the module)
            raise ConfigError(f"{where} cannot be imported: importing {name} raised {_exc_line(e)}; fix the "
                              "module") from e
    raise ConfigError(f"{where} cannot be imported ({_exc_line(first_error)}); install the package (pip install -e .) "
                      "or fix the dotted path") from first_error


def _locate(target: Any, key: str) -> Any:
    """The object a dotted path names (not checked for being callable)."""
    where = f"{_target_key(key)}={target}"
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"{where} is not a dotted path: name a class or function as package.module.name (e.g. "
                          "mypkg.nets.UNet)")
    importlib.invalidate_caches()  # a module written after the interpreter started is found too
    obj, n = _import_longest_module(parts, where)
    for i in range(n, len(parts)):
        try:
            obj = getattr(obj, parts[i])
        except AttributeError as e:
            raise ConfigError(f"{where} cannot be imported ({_exc_line(e)}); fix the dotted path (is "
                              f"{parts[i]} defined in {'.'.join(parts[:i])}?)") from e
    return obj


def load_target(target: str, key: str) -> Callable[..., Any]:
    """Import and return the callable `target` names (`pkg.module.name`, attributes of classes allowed); `key` is
    the config key holding it (`model` or `model._target_`), for the message."""
    obj = _locate(target, key)
    if not callable(obj):
        raise ConfigError(f"{_target_key(key)}={target} is not callable (type {type(obj).__name__}); name a class or a "
                          "function that builds the object")
    return obj


def _plain(node: Any) -> Dict[str, Any]:
    """A config node as plain Python (interpolations resolved)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in dict(node).items()}


def _signature(fn: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: they get the user's own keys only
        return None


def factory_kwargs(values: Dict[str, Any], schema_keys: Iterable[str], offered: Dict[str, Any],
                   sig: Optional[inspect.Signature]) -> Dict[str, Any]:
    """The keyword arguments of a factory: every key of the node except `_target_` and the schema's own keys, plus
    each schema key and each offered value only when the signature names it (or takes **kwargs). `schema_keys` may
    map each key to its schema default: a key at its default is then not passed. On a clash the
    user's own key wins over an offered value, and an offered value over a schema key's default."""
    defaults = dict(schema_keys) if isinstance(schema_keys, Mapping) else {}
    schema_keys = set(schema_keys)
    params = sig.parameters if sig is not None else {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def wanted(name: str) -> bool:
        p = params.get(name)
        return takes_any or (p is not None and p.kind is not inspect.Parameter.POSITIONAL_ONLY)

    # A schema key still at trainrun's default was not set by the user: the factory's own default applies
    # (a factory's `width=64` must not become the built-in ViT's width 192).
    kwargs = {k: v for k, v in values.items() if k in schema_keys and k != TARGET and wanted(k)
              and (k not in defaults or v != defaults[k])}
    kwargs.update({k: v for k, v in offered.items() if wanted(k)})
    kwargs.update({k: v for k, v in values.items() if k not in schema_keys and k != TARGET})
    return kwargs


def _check_binds(sig: inspect.Signature, kwargs: Dict[str, Any], where: str, section: str) -> None:
    """Refuse, in one line naming the argument, a call the factory's signature cannot take."""
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unexpected = [k for k in kwargs if not takes_any and (k not in params or
                                                          params[k].kind is inspect.Parameter.POSITIONAL_ONLY)]
    if unexpected:
        raise ConfigError(f"{where} does not take argument {unexpected[0]!r} (it takes "
                          f"{', '.join(params) or 'no arguments'}); remove {section}.{unexpected[0]} from the config")
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
                   and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        fix = f"add {missing[0]}: VALUE to the {section} option (or +{section}.{missing[0]}=VALUE on the command " \
            "line)" if missing else "fix its arguments in the config"
        raise ConfigError(f"{where} cannot be called with {sorted(kwargs)}: {e}; {fix}") from e


def call_factory(node: Any, key: str, schema_keys: Iterable[str], offered: Dict[str, Any]) -> Any:
    """Build the object a `_target_` node names (see factory_kwargs for its arguments). `key` is the section
    (`model`) or its target key (`model._target_`); `offered` holds what trainrun knows and a factory may take
    (input_shape, num_classes, num_outputs). A ConfigError raised by the factory itself passes through."""
    values = _plain(node)
    target = values.get(TARGET)
    where = f"{_target_key(key)}={target}"
    fn = load_target(target, key)
    sig = _signature(fn)
    kwargs = factory_kwargs(values, schema_keys, offered, sig)
    if sig is not None:
        _check_binds(sig, kwargs, where, _target_key(key)[: -len(TARGET) - 1])
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (user code may raise anything: one line naming the factory)
        raise ConfigError(f"{where} failed: {_exc_line(e)}") from e


@functools.lru_cache(maxsize=1)
def _distributions_by_top_level() -> Dict[str, tuple]:
    import importlib.metadata as md

    return {top: tuple(dict.fromkeys(dists)) for top, dists in md.packages_distributions().items()}


def _distribution_of(module: str) -> tuple:
    """(distribution name, version) of the installed distribution that owns `module`, or (None, None)."""
    import importlib.metadata as md

    dists = _distributions_by_top_level().get(module.split(".")[0], ())
    if not dists:
        return None, None
    try:
        return dists[0], md.version(dists[0])
    except md.PackageNotFoundError:
        return dists[0], None


def sha256_of(path: Path) -> str:
    """The SHA256 of a file, read in 1 MiB blocks (module sources here, weights files in models/weights.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_provenance(target: str) -> Dict[str, Any]:
    """Where a target's code came from, for meta.json: its module, the absolute path and SHA256 of the module's
    source file (None for builtins without a file), and the installed distribution owning it with its version
    (None for code that is only on sys.path)."""
    obj = _locate(target, "_target_")
    module_name = getattr(obj, "__module__", None) or target.rpartition(".")[0]
    module = sys.modules.get(module_name) or inspect.getmodule(obj)
    file = getattr(module, "__file__", None) if module is not None else None
    path = Path(file).resolve() if file else None
    package, version = _distribution_of(module_name)
    return {"target": target, "module": module_name, "file": str(path) if path else None,
            "sha256": sha256_of(path) if path and path.is_file() else None, "package": package, "version": version}


def config_targets(cfg_dict: Any) -> Dict[str, str]:
    """Every `_target_` in a resolved config, keyed by the dotted path of its node (`model`, `callbacks.counter`,
    `model.backbone`); list items are keyed by their index. The `hydra` subtree is Hydra's own and ignored."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg_dict):
        cfg_dict = OmegaConf.to_container(cfg_dict, resolve=True)
    found: Dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get(TARGET) is not None:
                found[path] = node[TARGET]
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            return
        for k, v in items:
            if not path and k == "hydra":
                continue
            if k != TARGET:
                walk(v, f"{path}.{k}" if path else str(k))

    walk(cfg_dict, "")
    return found


def check_trusted(stored: Dict[str, str], named: Dict[str, str]) -> None:
    """The trust rule of a resume: every target a checkpoint's stored config names must also be named by this
    command (its composed config, the user's config directory included), under any key; otherwise refuse before
    anything is imported."""
    allowed = set(named.values())
    for path, target in stored.items():
        if target not in allowed:
            key = _target_key(path) if path else TARGET
            raise ConfigError(f"resume refused: the checkpoint's config names {key}={target}, which this command does "
                              f"not; trainrun never imports code only a stored config names: pass {key}={target} "
                              "yourself if you trust it")


def import_targets(targets: Dict[str, str]) -> Dict[str, Callable[..., Any]]:
    """Import every target of a config (config_targets' output), so a bad one fails in one line before compute."""
    return {path: load_target(target, path or TARGET) for path, target in targets.items()}


SPLITS = ("train", "val", "test")


def as_datasets(result: Any, key: str = "data._target_", target: Optional[str] = None) -> Dict[str, Any]:
    """A data factory's return value as {"train", "val"[, "test"]} -> map-style torch Dataset. It may return a dict
    with those keys or a tuple/list (train, val[, test]); each part a map-style Dataset (returned as is) or an
    (x_tensor, y_tensor) pair of equal length (wrapped in a TensorDataset). `target` names the factory in messages.
    Refused in one line: a missing split, an unknown key, an empty or iterable dataset, a sample that is not (x, y)
    with x a tensor and y a tensor, int or float (sample 0 of each split is checked), tensors of unequal length."""
    where = f"{_target_key(key)}={target}" if target else _target_key(key)
    splits = _split_parts(result, where)
    return {name: _as_dataset(part, name, where) for name, part in splits.items()}


def _is_tensor_pair(obj: Any) -> bool:
    import torch

    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)


def _split_parts(result: Any, where: str) -> Dict[str, Any]:
    shape = 'a dict {"train": ..., "val": ...[, "test": ...]} or a tuple (train, val[, test])'
    if isinstance(result, dict):
        unknown = [k for k in result if k not in SPLITS]
        if unknown:
            raise DataError(f"{where} returns a dict with key {unknown[0]!r}: its keys are train, val and optionally "
                            f"test; return {shape}")
        parts = dict(result)
    elif _is_tensor_pair(result):
        raise DataError(f"{where} returns one (x, y) pair of tensors, not splits; return {shape} whose parts may be "
                        "(x, y) pairs")
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        parts = dict(zip(SPLITS, result))
    else:
        raise DataError(f"{where} returns a {type(result).__name__}; return {shape}")
    for name in ("train", "val"):
        if parts.get(name) is None:
            raise DataError(f'{where} returns no "{name}" dataset; return {shape}')
    return {k: v for k, v in parts.items() if v is not None}


def _as_dataset(part: Any, name: str, where: str) -> Any:
    import torch
    from torch.utils.data import IterableDataset, TensorDataset

    if isinstance(part, IterableDataset):
        raise DataError(f'{where} returns an IterableDataset for "{name}": trainrun batches and orders map-style '
                        "datasets itself so that a resumed run continues exactly; return a map-style Dataset "
                        "(__len__ and __getitem__)")
    if _is_tensor_pair(part):
        x, y = part
        if len(x) != len(y):
            raise DataError(f'{where} returns tensors of unequal length for "{name}": x has {len(x)} samples, y has '
                            f"{len(y)}; give one label per sample")
        part = TensorDataset(x, y)
    elif isinstance(part, (tuple, list)) and len(part) == 2 and isinstance(part[0], torch.Tensor):
        raise DataError(f'{where} returns (x, y) for "{name}" with y a {type(part[1]).__name__}: an (x, y) pair needs '
                        "two tensors (torch.as_tensor(y))")
    elif not (hasattr(part, "__len__") and hasattr(part, "__getitem__")) or isinstance(part, torch.Tensor):
        raise DataError(f'{where} returns a {type(part).__name__} for "{name}": return a map-style Dataset '
                        "(__len__ and __getitem__) or an (x, y) pair of tensors")
    if len(part) == 0:
        raise DataError(f'{where} returns an empty dataset for "{name}"; every split needs at least one sample')
    _check_sample(part, name, where)
    return part


def _check_sample(dataset: Any, name: str, where: str) -> None:
    """Sample 0 is an (x, y) pair with x a tensor and y a tensor, int or float."""
    import torch

    try:
        sample = dataset[0]
    except Exception as e:  # noqa: BLE001  (user code)
        raise DataError(f'{where}: "{name}"[0] raised {_exc_line(e)}; fix the dataset\'s __getitem__') from e
    pair = isinstance(sample, (tuple, list)) and len(sample) == 2
    if not pair:
        raise DataError(f'{where}: "{name}"[0] is a {type(sample).__name__}, not a pair (x, y); __getitem__ must '
                        "return (x, y) with x a tensor and y a tensor, int or float")
    x, y = sample
    if not isinstance(x, torch.Tensor):
        raise DataError(f'{where}: "{name}"[0] has x of type {type(x).__name__}; x must be a tensor (convert it with '
                        "torch.as_tensor in __getitem__)")
    if not isinstance(y, (torch.Tensor, int, float)):
        raise DataError(f'{where}: "{name}"[0] has y of type {type(y).__name__}; y must be a tensor, int or float')


def schema_defaults(schema_cls) -> Dict[str, Any]:
    """{key: default} of a config dataclass (for call_factory's schema_keys)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(schema_cls), resolve=True)
