import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Small, fast defaults for end-to-end runs: a handful of steps on the real digits data.
FAST = ["logger.progress=lines", "logger.log_every=5", "logger.plots=false"]


def run_cli(cwd: Path, *args: str, check: bool = True, entry: str = "trainrun", timeout: int = 600):
    """Run the CLI exactly as a user would (`python -m trainrun ...`) inside `cwd`."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    module = {"trainrun": "trainrun", "recipes": "trainrun.cli"}[entry]
    cmd = [sys.executable, "-m", module, *args] if entry == "trainrun" else \
        [sys.executable, "-c", "from trainrun.cli import list_recipes_main; list_recipes_main()"]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trainrun {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_jsonl(path: Path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sha_of(run_dir: Path, step: int) -> str:
    return (Path(run_dir) / "checkpoints" / f"step_{step:09d}" / "state.pt.sha256").read_text().split()[0]


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(tmp_path, *args, *FAST, **kw)
    _run.dir = tmp_path
    return _run


def structured(schema, **values):
    """A typed config node of `schema` (a trainrun.config dataclass) with some fields set."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(schema)
    for k, v in values.items():
        cfg[k] = v
    return cfg
