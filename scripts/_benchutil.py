"""Shared helpers of the benchmark scripts: statistics, machine facts, markdown tables, the JSON record.

Timings on a shared machine are noisy: every script interleaves its variants (A B C A B C ...) so that
load spikes hit all of them alike, and reports the median with the spread (min-max) of the repetitions.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "docs" / "bench"


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of xs by linear interpolation (statistics.quantiles' 'inclusive' method)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> Dict[str, Any]:
    """median, min, max and the relative spread (max-min)/median of a list of repetitions."""
    xs = list(xs)
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "spread_rel": float("nan"), "n": 0}
    m = statistics.median(xs)
    return {"median": m, "min": min(xs), "max": max(xs), "spread_rel": (max(xs) - min(xs)) / m if m else float("nan"),
            "n": len(xs), "values": xs}


def load() -> Dict[str, Any]:
    """The machine's load averages and `uptime` line, recorded with every result."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = ""
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"uptime": line, "loadavg_1_5_15": list(la), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def git_state() -> Dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def machine() -> Dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}


def default_out(name: str, quick: bool) -> Path:
    """docs/bench/NAME.json for a real run; a --quick smoke run writes to the temp dir (never over real results)."""
    if quick:
        return Path(tempfile.gettempdir()) / "trainrun-bench" / f"{name}.quick.json"
    return BENCH_DIR / f"{name}.json"


def write_json(path: Path, record: Dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def header(name: str, argv: List[str], quick: bool) -> Dict[str, Any]:
    return {"benchmark": name, "command": "python scripts/" + name + ".py" + "".join(" " + a for a in argv),
            "quick": quick, "machine": machine(), "load_before": load(), "git": git_state()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return v if isinstance(v, str) else fmt(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def med_range(s: Dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    """'median (min-max)' of a summary()."""
    if pct:
        return f"{100 * s['median']:.1f}% ({100 * s['min']:.1f}-{100 * s['max']:.1f})"
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


def quiet_env() -> Dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
