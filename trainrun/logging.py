"""Run output: rich console (progress bar on a terminal, plain lines otherwise), metrics.jsonl, wandb."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from trainrun.errors import TrainrunError


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb | tensorboard | mlflow (every one also writes metrics.jsonl)
    log_every: int = 10  # optimizer steps between metric lines
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | off
    plots: bool = True  # draw plots/{loss,accuracy,lr}.png into the run directory when the run ends
    project: str = "trainrun"  # wandb
    entity: Optional[str] = None  # wandb
    mode: str = "offline"  # wandb: online | offline | disabled
    group: Optional[str] = None  # wandb
    backends: List[str] = field(default_factory=list)  # trackers beside logger.name: wandb | tensorboard | mlflow
    mlflow_uri: Optional[str] = None  # MLflow tracking store; default sqlite:///OUTPUT_ROOT/mlflow.db
    mlflow_experiment: str = "trainrun"



METRICS_FILE = "metrics.jsonl"


def console() -> Console:
    return Console(stderr=False, highlight=False, soft_wrap=True)


def write_failure(path: Path, e: OSError, run_dir: Path, done: str = "") -> TrainrunError:
    """One line for a failed write into a run (a full disk, a quota, an I/O error): what, where, how much room is
    left, and the fix; `resume=` is offered only once the run has a checkpoint to resume from."""
    import errno
    import shutil

    from trainrun import checkpoint

    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    what = "disk full: " if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else ""
    if checkpoint.list_checkpoints(run_dir):
        then = (done or "the checkpoints written so far are intact") + f"; free disk space, then continue with " \
            f"resume={Path(run_dir)}"
    else:
        then = "no checkpoint was written yet; free disk space or set output_root to a larger disk, then run the " \
            "command again"
    return TrainrunError(f"{what}could not write {path} ({e.strerror or e}; {free}); {then}")


def trim_metrics(run_dir: Path, step: int) -> None:
    """On resume, keep the rows up to the checkpoint's step; rows past it (a killed run's tail) move aside.
    A failed write (a full disk) changes nothing: the temporary file goes, the side file is cut back."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
        except ValueError:
            drop.append(line)
    tmp, side = path.with_name(f".{path.name}.tmp"), path.with_name("metrics.discarded.jsonl")
    side_size = side.stat().st_size if side.is_file() else None
    try:
        tmp.write_text("".join(line + "\n" for line in keep))
        if drop:
            with open(side, "a") as f:
                f.write("\n".join(drop) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if drop and side.is_file():
            os.truncate(side, side_size) if side_size is not None else side.unlink()
        raise write_failure(path, e, run_dir, f"{METRICS_FILE} and the checkpoints are unchanged") from e


def _fmt(v: Any) -> str:
    """Floats the way :g reads: no trailing zeros (80, 12.52, 0.1504), 4 decimals at most below 100, none from
    100, and 3-digit scientific notation below 1e-3."""
    if not isinstance(v, float) or v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.3e}"
    text = f"{v:.0f}" if abs(v) >= 100 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


_BAR_WIDTH = 20


def _progress(console: Console, total: int) -> Progress:
    """The bar's fixed columns never wrap or shrink; the metrics column takes what is left (see `_fit_info`)."""
    from rich.table import Column

    def fixed():
        return Column(no_wrap=True)

    return Progress(TextColumn("[bold]train", table_column=fixed()), BarColumn(_BAR_WIDTH, table_column=fixed()),
                    MofNCompleteColumn(table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
                    TextColumn("eta", table_column=fixed()), TimeRemainingColumn(table_column=fixed()),
                    TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                    console=console, transient=False)


def _fit_info(info: str, width: int, total: int) -> str:
    """Cut the metrics text to the width the fixed columns leave, so the step count and ETA always show."""
    fixed = len("train") + _BAR_WIDTH + 2 * len(str(total)) + 1 + 8 + len("eta") + 8 + 7  # 7 column gaps
    room = width - fixed - 1
    return info if len(info) <= room else info[:max(0, room - 1)] + "…"


def config_tree(cfg, defaults) -> "Tree":
    """A compact tree of the config: each group with its option name and the keys that differ from the schema;
    groups with neither are left out, and `model` shows only the keys the selected model reads."""
    from omegaconf import OmegaConf
    from rich.markup import escape
    from rich.tree import Tree

    from trainrun.models import MODELS

    tree = Tree("[bold]config[/] (non-default values)")
    for key in cfg:
        node, base = cfg[key], defaults.get(key)
        if OmegaConf.is_dict(node):
            changed = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                       if k != "name" and (base is None or OmegaConf.to_container(base, resolve=True).get(k) != v)}
            target = node.get("_target_")
            if target:  # user code: its target names it, and trainrun's built-in name means nothing here
                changed.pop("_target_", None)
            if key == "model" and not target:
                factory = MODELS.get(node.get("name")) if node.get("name") in MODELS else None
                used = getattr(factory, "config_keys", None)
                changed = {k: v for k, v in changed.items() if used is None or k in used}
            if not changed and "name" not in node:
                continue
            label = f"[bold]{key}[/]" + (f": {escape(target)}" if target else
                                          f": {node.get('name')}" if "name" in node else "")
            branch = tree.add(label)
            for k, v in changed.items():
                branch.add(escape(f"{k}: {v}"))
        elif node != base:
            tree.add(escape(f"{key}: {node}"))
    return tree


def print_metrics(con: Console, title: str, metrics: Dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, _fmt(v))
    con.print(table)


class RunLogger:
    def __init__(self, cfg, run_dir: Path, total_steps: int, start_step: int, config: Dict[str, Any],
                 wandb_id: Optional[str], main_process: bool = True,
                 tracker_ids: Optional[Dict[str, Optional[str]]] = None):
        self.cfg, self.run_dir, self.total = cfg, Path(run_dir), total_steps
        self.main = main_process  # under torchrun only rank 0 prints and writes; the others stay silent
        self.console = console() if main_process else Console(file=open(os.devnull, "w"))
        # wandb first: its import patches sys.stdout/sys.stderr.write to capture the console (output.log), so it
        # must see the real streams, not the proxies a running rich progress bar puts in their place (the capture
        # would be lost once the bar stops); and a failing wandb.init then leaves no bar or open file behind.
        self.wandb = None
        self.wandb_id = wandb_id
        from trainrun.trackers import active, open_trackers

        if "wandb" in active(cfg) and main_process:
            import wandb  # deferred: only runs that ask for wandb pay its import

            # The same id on every resume continues the same wandb run (offline: one offline-run-*-ID folder per
            # invocation, all synced into one run); steps are trainrun's global optimizer steps.
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(self.run_dir),
                                    id=wandb_id, resume="allow", config=config, group=cfg.group,
                                    name=self.run_dir.name)
        self.trackers = []
        try:
            self.trackers = open_trackers(cfg, self.run_dir, config, tracker_ids or {}) if main_process else []
        except BaseException:
            self._finish_trackers(1)
            raise
        self.file = open(self.run_dir / METRICS_FILE if main_process else os.devnull, "a", buffering=1)
        self._write_failed = False
        mode = cfg.progress if main_process else "off"
        if mode == "auto":
            mode = "bar" if self.console.is_terminal else "lines"
        self.mode = mode
        self.progress: Optional[Progress] = None
        if mode == "bar":
            self.progress = _progress(self.console, total_steps)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def print(self, *args, **kw) -> None:
        self.console.print(*args, **kw)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._write(row)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        for tracker in self.trackers:
            tracker.log(metrics, step)
        if self.mode == "off":
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "epoch")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=_fit_info(info, self.console.width, self.total))
        else:  # plain text: rich's markup and wrapping cost ~0.3 ms a line, 3% of a 1 ms step at log_every=10
            out = self.console.file
            out.write(f"step {step}/{self.total}  {info}\n")
            out.flush()

    def _write(self, row: Dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk mid-run: one line, the checkpoints already written stay valid
            self._write_failed = True
            raise write_failure(self.run_dir / METRICS_FILE, e, self.run_dir) from e

    def log_stats(self, step: int, scalars: Dict[str, Any], detail: Dict[str, Any]) -> None:
        """The doctor's statistics: scalars to metrics.jsonl and wandb, per-layer detail to wandb only (stats.jsonl
        has everything); nothing on the console."""
        self._write({"step": step, "time": round(time.time(), 3), **scalars})
        if self.wandb is not None:
            self.wandb.log({**scalars, **detail}, step=step)
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def checkpoint_saved(self, step: int, sha256: str) -> None:
        """Each tracker records the SHA256 of the checkpoint just written."""
        for tracker in self.trackers:
            tracker.checkpoint(step, sha256)

    def tracker_ids(self) -> Dict[str, str]:
        """What meta.json keeps so a resume continues the same tracker runs (MLflow's run id)."""
        return {"mlflow_run_id": t.run_id for t in self.trackers if hasattr(t, "run_id")}

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def summary(self, title: str, metrics: Dict[str, Any]) -> None:
        self.stop_progress()
        print_metrics(self.console, title, metrics)
        if self.wandb is not None:
            self.wandb.summary.update(dict(metrics))
        for tracker in self.trackers:
            tracker.summary(metrics)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self, exit_code: int = 0) -> None:
        """Called from the runner's `finally`: the wandb run is finished (with the exit code) on every path."""
        try:
            self.stop_progress()
            try:
                self.file.close()  # flushes what a failed write left in the buffer: it fails again
            except OSError as e:
                if exit_code == 0 and not self._write_failed:  # else the run's own error is already on its way
                    raise write_failure(self.run_dir / METRICS_FILE, e, self.run_dir) from e
        finally:
            self._finish_trackers(exit_code)
            run, self.wandb = self.wandb, None
            if run is not None:
                try:
                    run.finish(exit_code=exit_code)
                except Exception as e:  # never mask the run's own error with a logging one
                    self.console.print(f"[yellow]warning:[/] wandb.finish failed: {e}")
            sys.stdout.flush()

    def _finish_trackers(self, exit_code: int) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(exit_code)
            except Exception as e:  # noqa: BLE001  (never mask the run's own error with a logging one)
                self.console.print(f"[yellow]warning:[/] closing {type(tracker).__name__} failed: {e}")


def check(cfg) -> None:
    """Range checks of the logger section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "logger")
    checks.one_of("name", ("console", "wandb", "tensorboard", "mlflow"))
    from trainrun.trackers import BACKENDS

    unknown = [b for b in cfg.get("backends") or [] if b not in BACKENDS]
    if unknown:
        checks.fail("backends", f"{unknown[0]!r} is not a tracker; choose from {', '.join(BACKENDS)}")
    checks.one_of("progress", ("auto", "bar", "lines", "off"))
    checks.one_of("mode", ("online", "offline", "disabled"))
    checks.positive("log_every")
