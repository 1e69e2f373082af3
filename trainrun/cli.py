"""The Hydra entrypoint: compose configs/ + recipes/, hand the config to `runner.run`.

Also the small listing commands (`trainrun-recipes`) and the resolvers that pick the run directory:
a new run gets `output_root/<timestamp or run_name>`; a resume writes into the run it resumes.
"""
from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Dict, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainrun.config import register_configs
from trainrun.errors import TrainrunError


def _asset_dir(name: str) -> Path:
    """configs/ or recipes/: inside the installed package (wheel) or at the repo top (editable/source)."""
    here = Path(__file__).resolve().parent
    for cand in (here / name, here.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"trainrun cannot find its {name}/ directory next to {here}")


CONFIGS_DIR = _asset_dir("configs")
RECIPES_DIR = _asset_dir("recipes")


def recipe_headers() -> Dict[str, str]:
    """name -> the recipe's leading comment block (what it reproduces, what it reached)."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if text and not text.startswith("@package"):
                lines.append(text)
        out[path.stem] = "\n".join(lines)
    return out


def register_recipes() -> None:
    """Each recipes/NAME.yaml becomes config `recipe/NAME` in package _global_, selected by +recipe=NAME."""
    cs = ConfigStore.instance()
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


_FIXED_NOW: Optional[str] = None  # under torchrun: rank 0's clock, so every rank picks the same run directory


def _now() -> str:
    return _FIXED_NOW or dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _run_dir(mode: str, resume: Optional[str], output_root: str, run_name: Optional[str]) -> str:
    from trainrun import checkpoint

    if resume:
        try:
            ckpt = checkpoint.candidates(str(resume), Path(output_root), run_name)[0]
        except TrainrunError:
            ckpt = None  # runner.run reports the problem in one line before anything is written there
        if ckpt is not None:
            run = checkpoint.run_dir_of(ckpt)
            if mode == "eval":
                return str(run / "eval" / _now())
            if checkpoint.is_latest(ckpt):
                return str(run)
            return str(Path(output_root) / f"{run.name}-from-{ckpt.name}-{_now()}")  # a branch: never overwrite
    return str(Path(output_root) / (run_name or _now()))


def _sweep_dir(sweep_name: Optional[str]) -> str:
    return str(Path("multirun") / (sweep_name or _now()))


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("trainrun_run_dir"):
        OmegaConf.register_new_resolver("trainrun_run_dir", _run_dir)
    if not OmegaConf.has_resolver("trainrun_sweep_dir"):  # cached: every job of a sweep shares one directory
        OmegaConf.register_new_resolver("trainrun_sweep_dir", _sweep_dir, use_cache=True)


def setup() -> None:
    register_configs()
    register_recipes()
    _register_resolvers()


_FAILED_JOBS = []  # multirun jobs that failed in this process (the sweep goes on; the exit code says so)


def _task(cfg: DictConfig):
    from hydra.types import RunMode

    from trainrun.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        defaults = None
        if cfg.resume:
            from hydra import compose

            defaults = compose(config_name="config")  # what the config would be without this command's overrides
        try:
            final = run(cfg, run_dir, overrides, defaults)
        except TrainrunError as e:
            sys.stdout.flush()
            _fail(str(e), getattr(e, "exit_code", 2))
        return final.get(f"best {cfg.checkpoint.monitor}", final.get(cfg.checkpoint.monitor))
    return _sweep_job(cfg, run_dir, overrides, run)


def _sweep_job(cfg: DictConfig, run_dir: Path, overrides, run):
    """One job of a sweep: skip it if done, resume it if interrupted, record its result either way."""
    import time
    import traceback

    from trainrun import checkpoint, sweep

    done = sweep.read_result(run_dir)
    if done and done.get("status") == "completed" and done.get("overrides") == overrides:
        print(f"trainrun: sweep job {run_dir.name} already completed; skipped", flush=True)
        return done.get("best", (done.get("metrics") or {}).get(cfg.checkpoint.monitor))
    if not cfg.resume and checkpoint.list_checkpoints(run_dir):
        cfg.resume = str(run_dir)  # an interrupted job of this sweep continues from its latest checkpoint
    if cfg.logger.group is None:
        cfg.logger.group = run_dir.parent.name  # wandb groups a sweep's runs under the sweep's name
    (run_dir / "job_label.txt").write_text(" ".join(overrides) + "\n")
    t0 = time.perf_counter()
    try:
        final = run(cfg, run_dir, overrides)
    except Exception as e:  # noqa: BLE001  (record any failure; the remaining jobs still run)
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, TrainrunError):
            line = f"{type(e).__name__}: {line}"
            (run_dir / "error.txt").write_text(traceback.format_exc())
        print(f"trainrun: error: sweep job {run_dir.name} failed: {line}", file=sys.stderr, flush=True)
        sweep.write_result(run_dir, status="failed", error=line, overrides=overrides,
                           wall_time_s=round(time.perf_counter() - t0, 2))
        _FAILED_JOBS.append(run_dir.name)
        return None
    monitor = cfg.checkpoint.monitor
    metrics = {k: v for k, v in final.items() if k.startswith(("val", "val_raw"))}
    best = final.get(f"best {monitor}")
    sweep.write_result(run_dir, status="completed" if final.get("finished") else "interrupted", error=None, overrides=overrides, metrics=metrics, best=best,
                       step=final.get("step"), seed=cfg.seed, wall_time_s=final.get("wall_time_s"))
    if not final.get("finished") and not cfg.trainer.stop_at_step:  # SIGTERM/Ctrl-C: end the sweep, resumable
        print(f"trainrun: sweep stopped by a signal during job {run_dir.name}; re-run the same command to "
              "continue", file=sys.stderr, flush=True)
        sys.exit(143)
    return best if best is not None else metrics.get(monitor)


def _one_line(e: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one line that names the key and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from trainrun.config import TrainrunConfig

    chain, cur = [], e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, MissingConfigException) and err.missing_cfg_file:
            group, _, name = err.missing_cfg_file.rpartition("/")
            options = ", ".join(err.options or [])
            return f"unknown option {group}={name}: choose one of {options}"
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and getattr(err, "full_key", None):
            parent = err.full_key.rpartition(".")[0]
            node = OmegaConf.select(OmegaConf.structured(TrainrunConfig), parent) if parent \
                else OmegaConf.structured(TrainrunConfig)
            valid = ", ".join(node.keys()) if node is not None else ""
            return f"unknown config key '{err.full_key}': valid keys{' in ' + parent if parent else ''} are {valid}"
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            msg = str(getattr(err, "msg", err)).splitlines()[0]
            return f"{err.full_key}: {msg}"
    return str(e).strip().splitlines()[0]


def preflight(overrides) -> None:
    """Compose and validate once before Hydra starts, so bad input fails in one line and creates no run dir."""
    from hydra import compose, initialize_config_dir

    from trainrun.config import validate
    from trainrun.runner import adopt_checkpoint_config, check_resume_compatible

    try:
        with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="trainrun"):
            cfg = compose("config", overrides=list(overrides))
        validate(cfg)
        if cfg.distillation.name in ("response", "feature"):
            from trainrun import checkpoint

            checkpoint.candidates(cfg.distillation.teacher, Path(cfg.output_root), key="distillation.teacher")
        if cfg.resume and cfg.mode == "train":
            from trainrun import checkpoint

            meta = checkpoint.read_meta(checkpoint.candidates(cfg.resume, Path(cfg.output_root), cfg.run_name)[0])
            with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="trainrun"):
                defaults = compose("config")
            cfg = adopt_checkpoint_config(cfg, defaults, list(overrides), meta["config"]["resolved"])
            check_resume_compatible(meta["config"]["resolved"], OmegaConf.to_container(cfg, resolve=True))
    except TrainrunError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001  (Hydra raises several unrelated types for bad overrides)
        _fail(_one_line(e))


def _fail(msg: str, code: int = 2) -> None:
    from trainrun.distributed import env_info

    # Config, checkpoint and data errors are the same on every rank: under torchrun rank 0 alone reports them.
    if env_info().rank == 0:
        print(f"trainrun: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    global _FIXED_NOW
    from trainrun import distributed

    setup()
    args = sys.argv[1:]
    info = distributed.init("cpu" if "trainer.device=cpu" in args else "auto")
    if info.enabled:
        _FIXED_NOW = distributed.broadcast_object(_now())
    hydra_flags = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
                   "-p", "--package", "--resolve", "--version", "--config-path", "-cp", "--config-name", "-cn",
                   "--config-dir", "-cd", "--experimental-rerun"}
    if not any(a.split("=")[0] in hydra_flags for a in args):
        preflight([a for a in args if not a.startswith("hydra.") and not a.startswith("hydra/")])
    hydra.main(config_path=str(CONFIGS_DIR), config_name="config", version_base="1.3")(_task)()
    code = 0
    if _FAILED_JOBS:
        print(f"trainrun: {len(_FAILED_JOBS)} sweep job(s) failed: {', '.join(_FAILED_JOBS)} "
              "(see summary.csv in the sweep directory)", file=sys.stderr, flush=True)
        code = 1
    if info.enabled:
        distributed.teardown(code)  # barrier, destroy the group, flush, os._exit: gloo ranks exit cleanly
    sys.exit(code)


def list_recipes_main() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="trainrun recipes (trainrun +recipe=NAME)", show_lines=True)
    table.add_column("recipe", style="bold")
    table.add_column("what it reproduces / measured here")
    for name, header in recipe_headers().items():
        table.add_row(name, escape(header))
    Console().print(table)


def list_models_main() -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    from trainrun.models import describe_models

    table = Table(title="trainrun models (trainrun model=NAME)")
    table.add_column("model", style="bold")
    table.add_column("what it is")
    for name, doc in describe_models().items():
        table.add_row(name, escape(doc))
    Console().print(table)
