"""Sweeps (Hydra multirun): one result file per job, and a summary of the whole sweep.

Each job writes `result.json` into its directory when it ends, completed or failed. When the sweep ends,
`SweepSummary` (a Hydra callback) collects them into `summary.json`, `summary.csv` and a console table, with
jobs that differ only in `seed` grouped into mean ± std. Re-running the same sweep (same `sweep_name`)
skips completed jobs and resumes unfinished ones from their latest checkpoint.

Test results: a job evaluated with `mode=test resume=JOB` has JOB/test.json (trainrun.modes.test, which also
rewrites the summary). The summary then shows each job's test metric next to its validation metric, and the test
metric of the job the VALIDATION metric selects; the test metric never selects anything.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULT_FILE = "result.json"
TEST_FILE = "test.json"  # written by mode=test (trainrun.modes.test.RESULT)
MAX_NAME_BYTES = 200  # file systems allow 255 bytes per path component


def job_dir_name(override_dirname: str) -> str:
    """A job's directory name: its overrides (Hydra's override_dirname) as ONE path component. A `/` in a value
    (`data.root=d1/x.pt`) would nest the job a level deeper, out of the summary's sight: `%` and `/` are
    percent-encoded; a name too long for a file system keeps its head and a hash of the whole."""
    import hashlib

    name = override_dirname.replace("%", "%25").replace("/", "%2F").replace("\0", "%00") or "defaults"
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:MAX_NAME_BYTES - 13].decode(errors="ignore") + "-" + digest
    return name


def write_result(job_dir: Path, **fields: Any) -> None:
    path = Path(job_dir) / RESULT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(fields, indent=2, default=str))
    tmp.replace(path)


def read_result(job_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((Path(job_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _varying(jobs: List[Dict[str, Any]]) -> List[str]:
    """The override keys whose values differ between jobs (or are missing in some): what the sweep is about."""
    per_job = [dict(o.partition("=")[::2] for o in j.get("overrides", [])) for j in jobs]
    keys = {k for d in per_job for k in d}
    return [k for k in sorted(keys) if len({d.get(k) for d in per_job}) > 1]


def _label(overrides: List[str], keys: List[str], drop_seed: bool = False) -> str:
    keep = [o for o in overrides if o.partition("=")[0] in keys
            and not (drop_seed and o.lstrip("+~").startswith("seed="))]
    return " ".join(keep) or "(defaults)"


def _mean_std(values: List[float]) -> Dict[str, Any]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def test_metric_name(monitor: str) -> str:
    """The test split's counterpart of a validation metric: val/acc -> test/acc."""
    return "test/" + monitor[len("val/"):] if monitor.startswith("val/") else f"test/{monitor}"


def _test_result(job_dir: Path, monitor: str) -> Optional[Dict[str, Any]]:
    """What mode=test recorded for the job: its checkpoint, how it was chosen and the test metric."""
    try:
        r = json.loads((Path(job_dir) / TEST_FILE).read_text())
        metrics = r.get("metrics") or {}
    except (OSError, ValueError, AttributeError):
        return None
    value = metrics.get(test_metric_name(monitor))
    return {"value": value if isinstance(value, (int, float)) else None, "metrics": metrics,
            **{k: r.get(k) for k in ("checkpoint", "selected_by", "sha256", "step")}}


def select_by_validation(jobs: List[Dict[str, Any]], monitor_mode: str) -> Optional[Dict[str, Any]]:
    """The completed job with the best validation metric (its `best`); test results play no part."""
    scored = [j for j in jobs if j.get("status") == "completed" and isinstance(j.get("best"), (int, float))
              and not math.isnan(j["best"])]
    if not scored:
        return None
    pick = max if monitor_mode == "max" else min
    return pick(scored, key=lambda j: j["best"])


def summarize(sweep_dir: Path, monitor: str = "val/acc", monitor_mode: str = "max") -> Dict[str, Any]:
    """Collect every job's result.json under sweep_dir (jobs without one are reported as unfinished) and, where
    mode=test ran, its test.json."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "plots"))):
        r = read_result(d)
        if r is None:
            if (d / "metrics.jsonl").exists() or (d / "checkpoints").exists():
                jobs.append({"job": d.name, "status": "unfinished", "overrides": [], "error": None})
            continue
        jobs.append({"job": d.name, **r})
        test = _test_result(d, monitor)
        if test is not None:
            jobs[-1]["test"] = test
    keys = _varying(jobs)
    for j in jobs:
        j["label"] = _label(j.get("overrides", []), keys)
    groups: Dict[str, Dict[str, Any]] = {}
    for j in jobs:
        g = groups.setdefault(_label(j.get("overrides", []), keys, drop_seed=True),
                              {"jobs": [], "final": [], "best": [], "test": []})
        g["jobs"].append(j["job"])
        if j["status"] == "completed":
            g["final"].append((j.get("metrics") or {}).get(monitor))
            g["best"].append(j.get("best"))
            g["test"].append(_test_value(j))
    tested, test_name = any("test" in j for j in jobs), test_metric_name(monitor)
    grouped = [{"group": k, "jobs": v["jobs"], f"final {monitor}": _mean_std(v["final"]),
                f"best {monitor}": _mean_std(v["best"]), **({test_name: _mean_std(v["test"])} if tested else {})}
               for k, v in groups.items()]
    failed = [j for j in jobs if j["status"] != "completed"]
    chosen = select_by_validation(jobs, monitor_mode)
    selected = None if chosen is None else {
        "job": chosen["job"], "label": chosen["label"], f"best {monitor}": chosen["best"],
        test_name: _test_value(chosen), "test_checkpoint": (chosen.get("test") or {}).get("checkpoint")}
    return {"sweep_dir": str(sweep_dir), "monitor": monitor, "monitor_mode": monitor_mode, "jobs": jobs,
            "groups": grouped, "n_jobs": len(jobs), "n_failed": len(failed), "selected": selected}


def _fmt(stat: Dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f} (n={stat['n']})" if stat["n"] > 1 else f"{stat['mean']:.4f}"


def _value(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _test_value(job: Dict[str, Any]) -> Optional[float]:
    return (job.get("test") or {}).get("value")


def write_summary(sweep_dir: Path, monitor: str = "val/acc", console=None, monitor_mode: str = "max") -> Dict[str, Any]:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    s = summarize(sweep_dir, monitor, monitor_mode)
    sweep_dir = Path(sweep_dir)
    tested, test_name = any("test" in j for j in s["jobs"]), test_metric_name(monitor)
    test_cols = [test_name] if tested else []  # a test column only once some job has a test result
    (sweep_dir / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", "overrides", f"final {monitor}", f"best {monitor}", *test_cols,
                    "step", "wall_time_s", "error"])
        for j in s["jobs"]:
            w.writerow([j["job"], j["status"], " ".join(j.get("overrides", [])),
                        (j.get("metrics") or {}).get(monitor), j.get("best"),
                        *([_test_value(j)] if tested else []), j.get("step"), j.get("wall_time_s"),
                        j.get("error") or ""])
    console = console or Console()
    table = Table(title=f"sweep {sweep_dir}: {s['n_jobs']} jobs, {s['n_failed']} not completed")
    for col in ("swept values", "status", f"final {monitor}", f"best {monitor}", *test_cols, "wall s"):
        table.add_column(col)
    for j in s["jobs"]:
        table.add_row(j.get("label") or j["job"], j["status"] if j["status"] == "completed" else
                      f"[red]{j['status']}[/]: {escape(j.get('error') or '')}",
                      _value((j.get("metrics") or {}).get(monitor)), _value(j.get("best")),
                      *([_value(_test_value(j))] if tested else []), str(j.get("wall_time_s", "-")))
    console.print(table)
    if any(len(g["jobs"]) > 1 for g in s["groups"]):
        gt = Table(title="grouped over seeds (mean ± std)")
        for col in ("config", "jobs", f"final {monitor}", f"best {monitor}", *test_cols):
            gt.add_column(col)
        for g in s["groups"]:
            gt.add_row(g["group"], str(len(g["jobs"])), _fmt(g[f"final {monitor}"]), _fmt(g[f"best {monitor}"]),
                       *([_fmt(g[test_name])] if tested else []))
        console.print(gt)
    if tested and s["selected"] is not None:
        chosen = s["selected"]
        untested = f" (not tested: trainrun mode=test \"resume='{sweep_dir / chosen['job']}'\")"
        console.print(f"selected by {monitor} ({monitor_mode}): {escape(chosen['label'])}: best {monitor} "
                      f"{_value(chosen[f'best {monitor}'])}, {test_name} {_value(chosen[test_name])}"
                      + ("" if chosen[test_name] is not None else escape(untested)))
    return s


def refresh_summary(sweep_dir: Path) -> None:
    """Rewrite a finished sweep's summary files (after mode=test recorded a job's test result), with the monitor
    its summary was made for; nothing is printed."""
    import io

    from rich.console import Console

    try:
        old = json.loads((Path(sweep_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(old, dict) and isinstance(old.get("monitor"), str):
        write_summary(sweep_dir, old["monitor"], Console(file=io.StringIO()), str(old.get("monitor_mode", "max")))


class SweepSummary(Callback):
    """Hydra callback: summarize the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            try:
                write_summary(sweep_dir, str(config.checkpoint.monitor),
                              monitor_mode=str(config.checkpoint.monitor_mode))
            except OSError as e:  # a full disk: the jobs' own results (result.json) stand
                print(f"trainrun: error: could not write the summary of sweep {sweep_dir} ({e.strerror or e}); every "
                      "job's result.json is complete; free disk space, then re-run the same command to summarize",
                      file=sys.stderr, flush=True)
                return
            try:
                from trainrun.plots import plot_finished

                plot_finished(sweep_dir, sweep=True)
            except ImportError:
                pass
