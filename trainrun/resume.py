"""Resume: which checkpoint a `resume=` continues, whether this command may continue it, and whether what the
checkpoint holds fits the run built for this config.

Everything read from a checkpoint folder is untrusted input. Its SHA256 digests only detect corruption: a
deliberate edit can rewrite them too. The defence against that is here: the stored config is taken as plain data
(its strings are never resolved as interpolations), and every value of the state is checked for type, shape and
range against the model and optimizer built for this config before any of it is loaded.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainrun import checkpoint
from trainrun.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("trainrun")

# Keys whose change makes a checkpoint unusable (a section, or one key of it), and keys that never matter for a
# resume.
REFUSE_ON_CHANGE = ("model", "precision", "optimizer.name", "task.name", "task._target_", "finetune.freeze",
                    "finetune.train", "finetune.unfreeze_at", "finetune.unfreeze_unit", "finetune.lora_rank",
                    "finetune.lora_targets")
IGNORE_ON_RESUME = ("resume", "mode", "trainer.stop_at_step", "logger", "output_root", "run_name", "sweep_name")
WEIGHTS_MODES = ("eval", "test", "predict", "export", "consolidate", "generate")  # modes that use a checkpoint's weights, not
# its training state (each writes into RUN/<mode>/<time>)
_GROUPS = ("model", "optimizer", "precision")  # a changed `<group>.name` is undone with `<group>=<name>`


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not _under(k, IGNORE_ON_RESUME)]


# Sections a checkpoint written before they existed lacks: it was trained with these values.
_SECTIONS_ADDED = {"task": {"_target_": None, "name": "classification"}, "callbacks": {}}


def _schema_defaults() -> Dict[str, Any]:
    from trainrun.config import TrainrunConfig

    return OmegaConf.to_container(OmegaConf.structured(TrainrunConfig))


def _fill_missing(saved: Any, defaults: Any) -> Any:
    """The stored config with every key it lacks at the schema's default: a checkpoint written before a key
    existed was trained with the key's default, so that key did not change."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = dict(saved)
    for key, value in defaults.items():
        out[key] = _fill_missing(out[key], value) if key in out else value
    return out


def check_resume_compatible(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    old = {**{k: (dict(v) if k != "task" else {**new.get("task", {}), **v}) for k, v in _SECTIONS_ADDED.items()
              if k not in old}, **old}
    changes = config_changes(_fill_missing(old, _schema_defaults()), new)
    refused = [c for c in changes if _under(c[0], REFUSE_ON_CHANGE)]
    if refused:
        k, a, b = refused[0]
        section = k.split(".")[0]
        fix = f"{section}={a}" if k == f"{section}.name" and section in _GROUPS else f"{k}={a}"
        raise ConfigError(f"resume refused: {k} changed from {a!r} to {b!r}; the checkpoint was trained with "
                          f"another {section}: start a new run, or resume with {fix}")
    return changes


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal(value: Any) -> Any:
    """`value` (plain data read from disk) escaped so that OmegaConf keeps every string as it is: `${...}` is never
    resolved (no environment read, no decoder run) and `???` is refused rather than becoming a missing value."""
    if isinstance(value, str):
        if value == "???":
            raise CheckpointError("the checkpoint's stored config holds the value '???' (OmegaConf's missing value), "
                                  "which trainrun never writes: it was edited; resume from another checkpoint")
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    return value


def literal_config(value: Dict[str, Any]) -> DictConfig:
    """An OmegaConf node of stored plain data whose strings stay literal (see `literal`)."""
    return OmegaConf.create(literal(value))


def adopt_checkpoint_config(cfg: DictConfig, defaults: DictConfig, overrides: List[str],
                            saved: Dict[str, Any]) -> DictConfig:
    """A resume continues the run as it was configured: the checkpoint's resolved config, plus what this command
    changes on purpose (keys that differ from the defaults or that an override names, a group override naming its
    whole section) and the per-invocation keys (IGNORE_ON_RESUME). So `trainrun resume=RUN` needs no repeat of the
    original overrides or recipe, and `trainrun resume=RUN trainer.max_steps=2000` extends it. The stored config was
    saved resolved: it is taken literally, never resolved again."""
    from trainrun.config import schema

    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    base = _flatten(OmegaConf.to_container(defaults, resolve=True))
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    merged = literal_config(saved)
    for key, value in new.items():
        if new.get(key) != base.get(key) or _under(key, named) or _under(key, IGNORE_ON_RESUME):
            OmegaConf.update(merged, key, literal(value), force_add=True)
    return _typed(lambda: OmegaConf.merge(schema(), merged))


def adopt_trained_sections(cfg: DictConfig, saved: Dict[str, Any], sections) -> DictConfig:
    """`cfg` with the checkpoint's stored `sections` (mode=eval evaluates the checkpoint as it was trained)."""
    def merge():
        out = cfg.copy()
        for section in (s for s in sections if isinstance(saved.get(s), dict)):  # older checkpoints lack `task`
            out[section] = OmegaConf.merge(out[section], literal_config(saved[section]))
        return out
    return _typed(merge)


def _typed(merge) -> DictConfig:
    """Run a merge of the stored config into the schema; a value of the wrong type is one line, not a traceback."""
    try:
        out = merge()
        OmegaConf.to_container(out, resolve=True)  # a literal string in a number's place fails here, not later
        return out
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = re.sub(r"^While dereferencing interpolation '.*?': ", "", str(getattr(e, "msg", e)).splitlines()[0])
        raise CheckpointError(f"the checkpoint's stored config is not a valid trainrun config at {key} ({msg}): its "
                              f"{checkpoint.META} was edited; resume from another checkpoint") from e


def _check_meta(meta: Any, ckpt_dir: Path) -> None:
    """The fields of meta.json that a resume reads, with their types (an edited meta.json must not crash it)."""
    def bad(what: str):
        raise CheckpointError(f"checkpoint {ckpt_dir}: its {checkpoint.META} {what}, which trainrun never writes: "
                              "it was edited or written by something else; resume from another checkpoint")

    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("resolved"), dict):
        bad("has no config.resolved mapping")
    for section in ("model", "data", "precision", "optimizer"):
        if not isinstance(config["resolved"].get(section), dict):
            bad(f"has no config.resolved.{section} mapping")
    checks = {"step": lambda v: _is_int(v) and v >= 0, "sha256": lambda v: isinstance(v, str),
              "world_size": lambda v: _is_int(v) and v >= 1, "wall_time_s": lambda v: _is_number(v) and v >= 0,
              "wandb_id": lambda v: v is None or isinstance(v, str), "data": lambda v: isinstance(v, dict),
              "mlflow_run_id": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) is not None}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            bad(f"holds {key}={meta[key]!r}")
    fingerprint = meta.get("data", {}).get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        bad(f"holds data.fingerprint={fingerprint!r}")


AUTO = "auto"


def resolve_auto(resume: Optional[str], root: Path, run_name: Optional[str], mode: str = "train") -> Optional[str]:
    """resume=auto: the run directory `root/run_name` (root: where runs are written on this machine) when it holds
    a checkpoint (the resume then picks its newest valid one, as for any run directory), else None: the command
    starts the run. Any other value is returned as it is. A relaunched job (a SLURM requeue) runs the same
    command, so the name must be stable."""
    if resume != AUTO:
        return resume
    if mode != "train":
        raise ConfigError(f"resume=auto continues a training run (mode=train), not mode={mode}: name the run or "
                          "checkpoint to use, resume=RUN_DIR")
    if not run_name:
        raise ConfigError("resume=auto needs run_name: it continues the run of that name if it has a checkpoint and "
                          "starts it otherwise; add run_name=NAME (under SLURM a name that survives a requeue, e.g. "
                          "'run_name=${oc.env:SLURM_JOB_ID}')")
    run = Path(root) / str(run_name)
    return str(run) if checkpoint.list_checkpoints(run) else None


def load_resume(spec: str, cfg: DictConfig) -> Tuple[Path, Dict, Dict]:
    """The newest loadable checkpoint the spec points to; falls back past corrupt ones with a warning."""
    errors = []
    for cand in checkpoint.candidates(spec, cfg.output_root, cfg.run_name):
        try:
            if (cand / checkpoint.SHARDS).is_dir():  # checkpoint.format=sharded: its own reader (a collective)
                from trainrun.checkpoint_sharded import load_for_resume

                state, meta = load_for_resume(cand, cfg.mode)
            else:
                state, meta = checkpoint.load(cand)
            _check_meta(meta, cand)
            for e in errors:
                log.warning("skipped a bad checkpoint: %s", e)
            return cand, state, meta
        except CheckpointError as e:
            if Path(spec).resolve() == cand.resolve():
                raise
            errors.append(str(e))
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no valid checkpoint for resume={spec}: {errors[0]}")


def resume_meta(spec: str, cfg: DictConfig) -> Dict[str, Any]:
    """The meta.json of the checkpoint `load_resume` would most likely pick (verified against its digest, the state
    file is not read): for the checks before Hydra starts."""
    errors = []
    for cand in checkpoint.candidates(spec, cfg.output_root, cfg.run_name):
        try:
            meta = checkpoint.read_meta(cand)
            _check_meta(meta, cand)
            return meta
        except CheckpointError as e:
            if Path(spec).resolve() == cand.resolve():
                raise
            errors.append(str(e))
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no valid checkpoint for resume={spec}: {errors[0]}")


def check_data(meta: Dict[str, Any], fingerprint: str, determinism: str, ckpt_dir: Path, data_name: str,
               is_main: bool = True) -> Optional[str]:
    """The checkpoint's data fingerprint when this run's data differs from it (else None): refused under
    determinism=error, a printed warning otherwise (the caller records it in meta.json)."""
    old = (meta.get("data") or {}).get("fingerprint")
    if old is None or old == fingerprint:
        return None
    what = (f"data.name={data_name} now has fingerprint {fingerprint[:8]}, the checkpoint {ckpt_dir.name} was "
            f"trained on {old[:8]}")
    if determinism == "error":
        raise DataError(f"resume refused: the data changed ({what}); determinism=error refuses to continue on other "
                        "data: restore the original data, or resume with determinism=warn to continue on this data")
    log.warning("resume on changed data: %s", what)
    if is_main:
        print(f"warning: resume on changed data: {what}; the run continues on this data (recorded in meta.json as "
              "data.fingerprint_changed_from; determinism=error refuses)", flush=True)
    return old


# --- the state: every value checked against the run built for this config -------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Refuse:
    def __init__(self, ckpt_dir: Path):
        self.where = f"checkpoint {ckpt_dir}"

    def __call__(self, what: str, fix: str = "it was edited or written by something else; resume from another "
                                             "checkpoint") -> None:
        raise CheckpointError(f"resume refused: {self.where}: {what}; {fix}")


def _check_tensors(refuse: _Refuse, saved: Any, expected: Dict[str, torch.Tensor], what: str, fix: Optional[str]):
    if not isinstance(saved, dict):
        refuse(f"{what} is a {type(saved).__name__}, not a mapping of tensors")
    missing, extra = [k for k in expected if k not in saved], [k for k in saved if k not in expected]
    if missing or extra:
        name = f"lacks {missing[0]!r}" if missing else f"has an unknown entry {extra[0]!r}"
        refuse(f"{what} {name} ({len(missing)} missing, {len(extra)} unknown entries)", *([fix] if fix else []))
    for key, ref in expected.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            refuse(f"{what} {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            refuse(f"{what} {key} has shape {list(value.shape)} but this config builds {list(ref.shape)}",
                   *([fix] if fix else []))
        if value.dtype.is_floating_point != ref.dtype.is_floating_point or value.dtype.is_complex:
            refuse(f"{what} {key} has dtype {value.dtype}, this config builds {ref.dtype}")


def _model_fix(changes: List[Tuple[str, Any, Any]]) -> str:
    data = [c for c in changes if c[0].startswith("data.")]
    if not data:
        return "the checkpoint holds another model: resume from another checkpoint or start a new run"
    k, a, b = data[0]
    return (f"this command changed {k} from {a!r} to {b!r}: resume with {k}={'null' if a is None else a}, or start "
            "a new run for the new data")


def _check_optimizer(refuse: _Refuse, saved: Any, optimizer: torch.optim.Optimizer, name: str) -> None:
    fix = (f"the checkpoint was trained with another optimizer than optimizer={name}: resume with the "
           "checkpoint's optimizer or start a new run")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        refuse("optimizer is not a mapping with 'state' and 'param_groups'")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        refuse(f"optimizer has {len(groups)} parameter groups, this config builds {len(optimizer.param_groups)}", fix)
    shapes: Dict[Any, Tuple[int, ...]] = {}
    for i, (group, ref) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            refuse(f"optimizer parameter group {i} is not a mapping with a 'params' list")
        missing = [k for k in ref if k not in group]
        if missing:
            refuse(f"optimizer parameter group {i} lacks {missing[0]!r} ({type(optimizer).__name__} needs it)", fix)
        if len(group["params"]) != len(ref["params"]):
            refuse(f"optimizer parameter group {i} has {len(group['params'])} parameters, this config builds "
                   f"{len(ref['params'])}", fix)
        for key, value in group.items():
            if key != "params" and not _plain(value):
                refuse(f"optimizer parameter group {i} holds {key}={value!r}")
        for pid, param in zip(group["params"], ref["params"]):
            if not (_is_int(pid) or isinstance(pid, str)) or pid in shapes:
                refuse(f"optimizer parameter group {i} lists parameter {pid!r} twice or with a bad id")
            shapes[pid] = tuple(param.shape)
    for pid, entry in saved["state"].items():
        if pid not in shapes or not isinstance(entry, dict):
            refuse(f"optimizer state has an entry for unknown parameter {pid!r}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                shape = tuple(value.shape)
                # a scalar (step) or the parameter's shape; Adafactor's factored rows/columns have 1 in one dim
                if shape and (len(shape) != len(shapes[pid]) or any(a not in (b, 1) for a, b in
                                                                    zip(shape, shapes[pid]))):
                    refuse(f"optimizer state {key} of parameter {pid} has shape {list(shape)}, the parameter is "
                           f"{list(shapes[pid])}", fix)
                if key == "step" and value.numel() == 1 and not float(value) >= 0:
                    refuse(f"optimizer state step of parameter {pid} is {float(value)}")
            elif not _plain(value):
                refuse(f"optimizer state {key} of parameter {pid} is a {type(value).__name__}")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _check_trainer(refuse: _Refuse, saved: Any, meta: Dict[str, Any]) -> None:
    from dataclasses import fields

    from trainrun.loop import TrainState

    if not isinstance(saved, dict):
        refuse(f"trainer is a {type(saved).__name__}, not a mapping")
    names = {f.name for f in fields(TrainState)}
    # the loop's position is required; a field added to TrainState later takes its default for older checkpoints
    missing = [k for k in ("step", "epoch", "batch_in_epoch", "samples") if k not in saved]
    extra = sorted(set(saved) - names)
    if missing or extra:
        refuse(f"trainer {'lacks ' + repr(missing[0]) if missing else 'has an unknown entry ' + repr(extra[0])}")
    saved = {**TrainState().to_dict(), **saved}
    for key in ("step", "epoch", "batch_in_epoch", "samples"):
        if not _is_int(saved[key]) or not 0 <= saved[key] < 2**53:
            refuse(f"trainer {key}={saved[key]!r} is not a count (an integer >= 0)")
    if not _is_int(saved["last_eval_step"]) or not -1 <= saved["last_eval_step"] <= saved["step"]:
        refuse(f"trainer last_eval_step={saved['last_eval_step']!r} is not between -1 and step={saved['step']}")
    if saved["epoch"] > saved["step"]:
        refuse(f"trainer epoch={saved['epoch']} exceeds step={saved['step']} (an epoch takes at least one step)")
    if "step" in meta and saved["step"] != meta["step"]:
        refuse(f"trainer step={saved['step']} but {checkpoint.META} records step {meta['step']}")
    if not isinstance(saved["stopped_early"], bool):
        refuse(f"trainer stopped_early={saved['stopped_early']!r} is not a boolean")
    best = saved["best_metric"]
    if best is not None and not (isinstance(best, (int, float)) and not isinstance(best, bool)):
        refuse(f"trainer best_metric={best!r} is not a number")
    last = saved["last_eval"]
    if not isinstance(last, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                             for k, v in last.items()):
        refuse("trainer last_eval is not a mapping of metric names to numbers")


def _check_rng(refuse: _Refuse, state: Dict[str, Any]) -> None:
    """Trial-restore each RNG state the resume may use, then put this process's state back exactly."""
    from trainrun.seed import capture_rng_state, restore_rng_state

    per_rank = state.get("rng_per_rank")
    if per_rank is not None and not isinstance(per_rank, list):
        refuse(f"rng_per_rank is a {type(per_rank).__name__}, not a list")
    current = capture_rng_state()
    try:
        for i, rng in enumerate([state["rng"], *(per_rank or [])]):
            what = "rng" if i == 0 else f"rng_per_rank[{i - 1}]"
            if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
                    or rng["torch"].dtype != torch.uint8 or rng["torch"].shape != current["torch"].shape:
                refuse(f"{what} is not a random generator state (python, numpy and torch states)")
            try:
                restore_rng_state(rng)
            except Exception as e:  # noqa: BLE001  (random/numpy/torch each reject a bad state their own way)
                refuse(f"{what} is not a valid random generator state ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})")
    finally:
        restore_rng_state(current)


def _check_parts(refuse: _Refuse, state: Dict[str, Any], model_sd: Dict[str, torch.Tensor]) -> None:
    """The optional parts (EMA, early stopping, schedule, scaler, curriculum) as their load_state_dict reads them."""
    counts = lambda d, keys: all(_is_int(d.get(k)) and d.get(k) >= -1 for k in keys)  # noqa: E731
    if "ema" in state:
        ema = state["ema"]
        if not isinstance(ema, dict) or not counts(ema, ("updates",)):
            refuse("ema is not a mapping with 'module' and an 'updates' count")
        _check_tensors(refuse, ema.get("module"), model_sd, "ema module", None)
    if "early_stopping" in state:
        es = state["early_stopping"]
        if not isinstance(es, dict) or not counts(es, ("best_step", "bad_evals")) \
                or not (es.get("best") is None or _is_number(es.get("best"))):
            refuse("early_stopping is not a mapping of best, best_step, bad_evals and best_weights")
        if es.get("best_weights") is not None:
            _check_tensors(refuse, es["best_weights"], model_sd, "early_stopping best_weights", None)
    sched = state["schedule"]
    if not isinstance(sched, dict):
        refuse(f"schedule is a {type(sched).__name__}, not a mapping")
    if sched.get("name") == "plateau":
        if not counts(sched, ("num_bad_evals", "cooldown_counter")) or not isinstance(sched.get("best"), (int, float)) \
                or not (_is_number(sched.get("scale")) and sched["scale"] > 0):
            refuse(f"schedule (plateau) holds scale={sched.get('scale')!r}, best={sched.get('best')!r}, "
                   f"num_bad_evals={sched.get('num_bad_evals')!r}: not a plateau schedule's counters")
    scaler = state["scaler"]
    if not isinstance(scaler, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in scaler.items()) \
            or scaler.get("scale", 1.0) <= 0:
        refuse(f"scaler holds {scaler!r}, not a gradient scaler's positive numbers")
    cur = state.get("curriculum", {})
    if not isinstance(cur, dict) or (cur and not (isinstance(cur.get("name"), str) and counts(cur, ("n", "epoch"))
                                                  and isinstance(cur.get("scores"), torch.Tensor))):
        refuse("curriculum is not a mapping of name, n, epoch and a scores tensor")


def check_state(ckpt_dir: Path, state: Any, meta: Dict[str, Any], model: torch.nn.Module,
                changes: List[Tuple[str, Any, Any]], optimizer: Optional[torch.optim.Optimizer] = None,
                optimizer_name: str = "", distill: Optional[torch.nn.Module] = None) -> None:
    """Refuse, in one line, a checkpoint whose state does not fit the run built for this config (types, tensor
    shapes against the built model and optimizer, counts and ranges, RNG states), before any of it is loaded.
    `optimizer` None: only what mode=eval reads (the model and EMA weights). `changes`: this command's config
    changes (named in the refusal when the model no longer fits)."""
    refuse = _Refuse(ckpt_dir)
    if not isinstance(state, dict):
        refuse(f"{checkpoint.STATE} holds a {type(state).__name__}, not a trainrun state mapping")
    sharded = (Path(ckpt_dir) / checkpoint.SHARDS).is_dir()  # its optimizer is in the shards: DCP checks it at load
    training = (() if sharded else ("optimizer",)) + ("schedule", "scaler", "trainer", "rng")
    required = ("model",) + (training if optimizer is not None else ())
    missing = [k for k in required if k not in state]
    if missing:
        refuse(f"{checkpoint.STATE} has no {missing[0]!r} entry")
    model_sd = model.state_dict()
    _check_tensors(refuse, state["model"], model_sd, "model", _model_fix(changes))
    if optimizer is None:
        if "ema" in state:
            _check_parts(refuse, {"ema": state["ema"], "schedule": {}, "scaler": {}}, model_sd)
        return
    if not sharded:
        _check_optimizer(refuse, state["optimizer"], optimizer, optimizer_name)
    _check_trainer(refuse, state["trainer"], meta)
    _check_parts(refuse, state, model_sd)
    if distill is not None and "distill" in state:
        _check_tensors(refuse, state["distill"], distill.state_dict(), "distill", None)
    _check_rng(refuse, state)
