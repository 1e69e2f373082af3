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


def _now() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


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


def _hydra_subdir(mode: str, resume: Optional[str]) -> str:
    # A resumed run keeps the original .hydra/ and records this invocation's composition beside it.
    return f".hydra/resume-{_now()}" if resume and mode == "train" else ".hydra"


def _register_resolvers() -> None:
    for name, fn in (("trainrun_run_dir", _run_dir), ("trainrun_hydra_subdir", _hydra_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def setup() -> None:
    register_configs()
    register_recipes()
    _register_resolvers()


def _task(cfg: DictConfig):
    from trainrun.runner import run

    hc = HydraConfig.get()
    try:
        return run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    except TrainrunError as e:
        sys.stdout.flush()
        print(f"trainrun: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    setup()
    hydra.main(config_path=str(CONFIGS_DIR), config_name="config", version_base="1.3")(_task)()


def list_recipes_main() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trainrun recipes (trainrun +recipe=NAME)", show_lines=True)
    table.add_column("recipe", style="bold")
    table.add_column("what it reproduces / measured here")
    for name, header in recipe_headers().items():
        table.add_row(name, header)
    Console().print(table)
