"""Where a run came from: git state, library versions, hardware, command line."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def _git(args, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(path: Path) -> Dict[str, Any]:
    """Commit and dirty flag of the git checkout containing `path` (None outside a checkout)."""
    commit = _git(["rev-parse", "HEAD"], path)
    if commit is None:
        return {"commit": None, "dirty": None, "root": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return {"commit": commit, "dirty": bool(status), "root": _git(["rev-parse", "--show-toplevel"], path)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def environment() -> Dict[str, Any]:
    """Versions and hardware; computed once per process."""
    from importlib.metadata import version

    import hydra
    import numpy
    import omegaconf

    import trainrun

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "versions": {
            "trainrun": trainrun.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": version("torchvision"),
            "hydra": hydra.__version__,
            "omegaconf": omegaconf.__version__,
            "numpy": numpy.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "hardware": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpus": gpus,
        },
        "git": git_info(Path(__file__).resolve().parent),
        "cwd_git": git_info(Path.cwd()),
    }


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
