"""`run(cfg)`: prepare (validate, find the checkpoint, adopt its config) -> build -> restore -> the mode.

Each arrow is one call into the module that owns it (trainrun.resume, trainrun.build, trainrun.modes). Everything
that can be checked (config values, resume checkpoint, config compatibility, user code, data) is checked before
the first training step.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from trainrun import checkpoint
from trainrun.build import Resumed, build, restore
from trainrun.config import validate
from trainrun.doctor import overfit_settings
from trainrun.errors import ConfigError
from trainrun.modes import CHECKPOINT_ONLY, MODES, RESTORES
from trainrun.resume import (AUTO, WEIGHTS_MODES, adopt_checkpoint_config, adopt_trained_sections,
                             check_resume_compatible, load_resume, resolve_auto)
from trainrun.seed import set_determinism

log = logging.getLogger("trainrun")


def run(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]] = None,
        defaults: Optional[DictConfig] = None) -> Dict[str, float]:
    """`defaults`: the config composed without this command's overrides; given, a resume adopts the
    checkpoint's config (see adopt_checkpoint_config)."""
    t0 = time.perf_counter()
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.mode in CHECKPOINT_ONLY:  # reads a checkpoint's files and writes new ones: no data, no model built
        return MODES.get(cfg.mode)(cfg, run_dir, t0)
    overfit_changes = overfit_settings(cfg) if cfg.mode == "overfit_batch" else []
    cfg, resumed, resolved = prepare(cfg, run_dir, overrides, defaults)
    set_determinism(cfg.determinism)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    built = build(cfg, run_dir, resumed, resolved)
    built.overrides, built.overfit_changes = list(overrides or []), overfit_changes
    if resumed and RESTORES[cfg.mode]:
        restore(built)
    return MODES.get(cfg.mode)(built, t0)


def prepare(cfg: DictConfig, run_dir: Path, overrides: Optional[List[str]],
            defaults: Optional[DictConfig]) -> Tuple[DictConfig, Optional[Resumed], dict]:
    """The config this run uses and the checkpoint it continues: a training resume adopts the checkpoint's config
    (this command's overrides win; a change that would make the checkpoint unusable is refused), an eval evaluates
    the checkpoint as it was trained, and a stored config never makes trainrun import code this command does not
    name."""
    if cfg.resume == AUTO:  # mode=train only: run_dir is root/run_name; a checkpoint there is continued
        cfg.resume = resolve_auto(cfg.resume, run_dir.parent, cfg.run_name, cfg.mode)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.resume:
        if cfg.mode in WEIGHTS_MODES:
            raise ConfigError(f"mode={cfg.mode} needs a checkpoint: resume=<run dir or checkpoint dir>")
        if checkpoint.list_checkpoints(run_dir):
            raise ConfigError(f"run directory {run_dir} already has checkpoints; continue it with resume={run_dir} "
                              "or pick another run_name")
        return cfg, None, resolved
    ckpt_dir, state, meta = load_resume(cfg.resume, cfg)
    stored, named = meta["config"]["resolved"], resolved  # `named`: the code this command names
    changes = []
    if cfg.mode == "train" and defaults is not None:
        cfg = adopt_checkpoint_config(cfg, defaults, list(overrides or []), stored)
        validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.mode == "train":
        changes = check_resume_compatible(stored, resolved)
        for k, a, b in changes:
            log.warning("resume with a changed config: %s %r -> %r", k, a, b)
    if cfg.mode in WEIGHTS_MODES:  # use the checkpoint as it was trained: its model, data, task and precision
        cfg = adopt_trained_sections(cfg, stored, ("model", "data", "task", "precision", "finetune"))
        resolved = OmegaConf.to_container(cfg, resolve=True)
    check_stored_code(resolved, named)
    return cfg, Resumed(ckpt_dir, state, meta, changes), resolved


def check_stored_code(adopted: dict, named: dict) -> None:
    """The trust rule: every `_target_` the run will import after adopting the checkpoint's stored config must be
    named by this command (its composed config, or an option file of the user's config directory); the stored
    config alone never makes trainrun import code. A stored callback switched off (`+callbacks.NAME=null`) is not
    imported, so it needs no naming."""
    from trainrun import usercode

    trusted = usercode.config_targets(named)
    trusted.update(_config_dir_targets())
    usercode.check_trusted(usercode.config_targets(adopted), trusted)


def _config_dir_targets() -> Dict[str, str]:
    """The `_target_`s written in the option files of the user's config directories (--config-dir,
    hydra.searchpath): naming a directory on the command line trusts the code its files name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
    except (ValueError, AttributeError):  # no Hydra context (tests calling run() directly)
        return {}
    from trainrun import usercode

    found: Dict[str, str] = {}
    for source in sources:
        if source.provider in ("hydra", "main", "schema") or not str(source.path).startswith("file://"):
            continue
        root = Path(str(source.path)[len("file://"):])
        for path in sorted(root.rglob("*.yaml")):
            try:
                data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # noqa: BLE001  (a file Hydra never composed is not ours to judge)
                continue
            for key, target in usercode.config_targets(data if isinstance(data, dict) else {}).items():
                found[f"{path.relative_to(root)}:{key}"] = target
    return found
