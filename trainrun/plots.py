"""Plots of a run's (or a sweep's) metrics.jsonl: loss, accuracy and learning rate against the step.

    trainrun-plots runs/exp1                 # -> runs/exp1/plots/{loss,accuracy,lr}.png
    trainrun-plots multirun/2024-05-01_12-00-00   # every job overlaid in <sweep>/plots/, plus each job's own plots

matplotlib is imported inside the functions (importing this module costs nothing) and drawn through the
non-interactive Agg canvas on a bare `Figure` (no pyplot): no display is needed, and the caller's global
matplotlib state (backend, open figures) is left alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

METRICS_FILE = "metrics.jsonl"  # = trainrun.logging.METRICS_FILE (not imported: that module pulls in rich)
PLOTS_DIR = "plots"
LABEL_FILE = "job_label.txt"
MAX_LEGEND_JOBS = 20
MAX_LABEL_CHARS = 60

# figure name -> (y-axis label, the series it draws, in legend order)
FIGURES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "loss": ("loss", ("train/loss", "val/loss", "val_raw/loss")),
    "accuracy": ("accuracy", ("train/acc", "val/acc", "val_raw/acc")),
    "lr": ("learning rate", ("lr",)),
}
# how a series is drawn: train rows are dense lines, eval rows sparse lines with markers
_STYLE = {
    "train": dict(linestyle="-", linewidth=1.4),
    "val": dict(linestyle="--", linewidth=1.4, marker="o", markersize=3.5),
    "val_raw": dict(linestyle=":", linewidth=1.4, marker="s", markersize=3),
    "lr": dict(linestyle="-", linewidth=1.4),
}

Series = Dict[str, List[Tuple[float, float]]]  # metric name -> [(step, value)] sorted by step


class PlotError(Exception):
    """A path that cannot be plotted (missing, or no metrics in it); main() reports it in one line."""


# ----------------------------------------------------------------------------------------------- reading
def read_metrics(path: Path) -> Series:
    """Every numeric metric in a metrics.jsonl as step-sorted (step, value) pairs.

    Lines that are not a JSON object with a numeric "step" (a torn last line, garbage) are skipped; non-numeric
    values are ignored. A step logged twice (a resumed run) keeps its last value.
    """
    by_key: Dict[str, Dict[float, float]] = {}
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if not _is_number(step):
            continue
        for key, value in row.items():
            if key in ("step", "time") or not _is_number(value):
                continue
            by_key.setdefault(key, {})[float(step)] = float(value)
    return {k: sorted(v.items()) for k, v in by_key.items()}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _present(series: Series, keys: Sequence[str]) -> List[str]:
    return [k for k in keys if series.get(k)]


def _has_data(series: Series) -> bool:
    return any(_present(series, keys) for _, keys in FIGURES.values())


def find_jobs(sweep_dir: Path) -> List[Path]:
    """Directories under sweep_dir holding a metrics.jsonl, outermost only (a run's eval/<time>/ is not a job),
    in natural order (0, 1, 2, ..., 10)."""
    sweep_dir = Path(sweep_dir)
    dirs = sorted({p.parent for p in sweep_dir.rglob(METRICS_FILE) if p.is_file()}, key=lambda d: len(d.parts))
    jobs: List[Path] = []
    for d in dirs:
        if not any(j == d or j in d.parents for j in jobs):
            jobs.append(d)
    return sorted(jobs, key=lambda d: _natural_key(d.relative_to(sweep_dir).as_posix()))


def _natural_key(s: str):
    """Numbers compare as numbers: 2 < 10, lr=0.001 < lr=0.01 < lr=0.1, 1e-4 < 1e-3; ties by the text."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", s)
    return [float(t) if i % 2 else t for i, t in enumerate(parts)], s


def job_overrides(job_dir: Path) -> List[str]:
    """A job's command-line overrides: the words of job_label.txt (written by trainrun's sweep jobs), else the
    items of Hydra's .hydra/overrides.yaml when a sweep kept it; [] when neither is there or readable."""
    job_dir = Path(job_dir)
    label_file, overrides = job_dir / LABEL_FILE, job_dir / ".hydra" / "overrides.yaml"
    try:
        if label_file.is_file():
            return label_file.read_text(errors="replace").split()
        if overrides.is_file():
            import yaml  # PyYAML, a dependency of omegaconf/hydra

            items = yaml.safe_load(overrides.read_text())
            if isinstance(items, list):
                return [" ".join(str(i).split()) for i in items]
    except Exception:  # a label is decoration: an unreadable one never stops a plot
        pass
    return []


def job_label(job_dir: Path, sweep_dir: Path, drop: Sequence[str] = ()) -> str:
    """The job directory's name (relative to the sweep) plus its overrides, less those in `drop` (plot_sweep drops
    the ones every job shares, so the legend shows what differs). A directory already named after its overrides
    (Hydra's override_dirname, `a=1,b=2`) is not repeated."""
    job_dir = Path(job_dir)
    name = job_dir.relative_to(sweep_dir).as_posix() if job_dir != Path(sweep_dir) else job_dir.name
    overrides = job_overrides(job_dir)
    extra = " ".join(o for o in overrides if o not in set(drop))
    if not extra:
        label = name
    elif "=" in name:
        label = extra
    else:
        label = f"{name}: {extra}"
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def _sweep_labels(jobs: Sequence[Path], sweep_dir: Path) -> List[str]:
    per_job = [job_overrides(j) for j in jobs]
    common = set.intersection(*(set(o) for o in per_job)) if len(jobs) > 1 else set()
    return [job_label(j, sweep_dir, drop=common) for j in jobs]


# ----------------------------------------------------------------------------------------------- drawing
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _style(key: str) -> dict:
    return dict(_STYLE.get(key.split("/")[0], _STYLE["train"]))


def _spans_decades(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 100


def _finish_axes(ax, figure: str, ylabel: str, values: List[float], log_y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log_y or (figure == "loss" and _spans_decades(values)):
        ax.set_yscale("log")  # a loss falling over orders of magnitude (or LRs swept over them) reads better
        ax.set_ylabel(f"{ylabel} (log scale)")
    elif figure == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # write then rename: a viewer never sees half a PNG
        tmp.replace(path)
    except OSError:  # a full disk: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def plot_run(run_dir) -> List[Path]:
    """Write run_dir/plots/{loss,accuracy,lr}.png from run_dir/metrics.jsonl; figures with no data are skipped.

    Returns the files written ([] for an empty or unreadable metrics file)."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / METRICS_FILE)
    written: List[Path] = []
    for figure, (ylabel, keys) in FIGURES.items():
        present = _present(series, keys)
        if not present:
            continue
        fig = _new_figure(7.0, 4.5)
        ax = fig.add_subplot()
        values: List[float] = []
        for key in present:
            xs, ys = zip(*series[key])
            values.extend(ys)
            ax.plot(xs, ys, label=key, **_style(key))
        _finish_axes(ax, figure, ylabel, values)
        ax.set_title(f"{run_dir.resolve().name}: {ylabel}")
        ax.legend(fontsize="small")
        written.append(_save(fig, run_dir / PLOTS_DIR / f"{figure}.png"))
    return written


def plot_finished(path, sweep: bool = False) -> List[Path]:
    """The plots a run (or a sweep) draws when it ends. They are a by-product: a failed write (a full disk) is one
    warning line, and the run's result and checkpoints stand."""
    try:
        return plot_sweep(path) if sweep else plot_run(path)
    except OSError as e:
        print(f"trainrun: warning: could not write the plots of {path} ({e.strerror or e}); the results and "
              f"checkpoints are complete; free disk space, then draw them with trainrun-plots {path}",
              file=sys.stderr, flush=True)
        return []


CONFUSION_FILE, RELIABILITY_FILE = "confusion_matrix.png", "reliability.png"
MAX_ANNOTATED_CLASSES = 20  # counts are written in the cells up to this many classes
MAX_TICK_CLASSES = 60  # class names on the axes up to this many classes (beyond: every n-th)


def plot_evaluation(run_dir, evaluation, title: str = "") -> List[Path]:
    """run_dir/plots/confusion_matrix.png (classification) and reliability.png (when ECE was measured) from the
    accumulator of an evaluation (trainrun.metrics; the trainer's `task.last_evaluation`). None or a task without
    them draws nothing. Like plot_finished, a failed write is one warning line."""
    if evaluation is None:
        return []
    run_dir = Path(run_dir)
    written: List[Path] = []
    try:
        confusion = evaluation.confusion_matrix()
        if confusion is not None and int(confusion.sum()) > 0:
            from trainrun.metrics import class_labels

            labels = class_labels(getattr(evaluation, "class_names", None), confusion.shape[0])
            written.append(_save(confusion_figure(confusion, labels, title),
                                 run_dir / PLOTS_DIR / CONFUSION_FILE))
        bins = evaluation.reliability()
        if bins is not None and float(bins["count"].sum()) > 0:
            written.append(_save(reliability_figure(bins, title), run_dir / PLOTS_DIR / RELIABILITY_FILE))
    except OSError as e:
        print(f"trainrun: warning: could not write the evaluation plots of {run_dir} ({e.strerror or e}); the "
              "results and checkpoints are complete", file=sys.stderr, flush=True)
    return written


def confusion_figure(confusion, labels: Sequence[str], title: str = ""):
    """Rows: the true class, columns: the predicted one; colour: the row's share (recall), text: the counts."""
    counts = confusion.double()
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(labels)
    side = min(16.0, max(4.5, 0.45 * n + 2.5))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    step = max(1, math.ceil(n / MAX_TICK_CLASSES))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45 if max(map(len, labels)) > 2 else 0, ha="right"
                  if max(map(len, labels)) > 2 else "center", fontsize="small")
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize="small")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize="small",
                            color="white" if share[i, j] > 0.55 else "black")
    accuracy = float(counts.trace() / counts.sum().clamp_min(1))
    ax.set_title(f"{title + ': ' if title else ''}confusion matrix (accuracy {accuracy:.4f}, "
                 f"{int(counts.sum())} samples)")
    return fig


def reliability_figure(bins: Dict, title: str = ""):
    """Top: each bin's accuracy against its mean confidence (bars) and the diagonal of perfect calibration;
    bottom: how many samples fall in each bin."""
    edges, count = bins["edges"].numpy(), bins["count"].numpy()
    x_label, y_label = bins.get("axes", ("confidence", "accuracy"))
    width, left = edges[1:] - edges[:-1], edges[:-1]
    filled = count > 0
    fig = _new_figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(left[filled], bins["accuracy"].numpy()[filled], width=width[filled], align="edge", color="tab:blue",
            edgecolor="black", linewidth=0.6, label=f"{y_label} in the bin")
    # the gap runs from the bin's accuracy to its mean confidence: hatched, so the accuracy bar stays visible
    top.bar(left[filled], (bins["confidence"] - bins["accuracy"]).numpy()[filled],
            bottom=bins["accuracy"].numpy()[filled], width=width[filled], align="edge", facecolor="none",
            hatch="//", edgecolor="tab:red", linewidth=0.8, label="gap to the bin's mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel(y_label)
    top.grid(True, alpha=0.3)
    top.legend(fontsize="small", loc="upper left")
    top.set_title(f"{title + ': ' if title else ''}reliability (ECE {float(bins['ece']):.4f}, {len(count)} bins)")
    bottom.bar(left, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.6)
    bottom.set_xlabel(x_label)
    bottom.set_ylabel("samples")
    if count.max() / max(1.0, count[count > 0].min()) >= 100:
        bottom.set_yscale("log")
    return fig


def plot_sweep(sweep_dir) -> List[Path]:
    """Write sweep_dir/plots/{loss,accuracy,lr}.png with every job under sweep_dir overlaid: one colour per job
    (labelled by job_label), one line style per series (train solid, val dashed, val_raw dotted).

    Returns the files written ([] when no job has data)."""
    sweep_dir = Path(sweep_dir)
    jobs = [(job, read_metrics(job / METRICS_FILE)) for job in find_jobs(sweep_dir)]
    jobs = [(job, s) for job, s in jobs if _has_data(s)]
    if not jobs:
        return []
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    n = len(jobs)
    if n <= 10:
        colors = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colors = [colormaps["tab20"](i) for i in range(n)]
    else:
        colors = [colormaps["viridis"](i / (n - 1)) for i in range(n)]
    labels = _sweep_labels([job for job, _ in jobs], sweep_dir)
    written: List[Path] = []
    for figure, (ylabel, keys) in FIGURES.items():
        drawn_keys = [k for k in keys if any(s.get(k) for _, s in jobs)]
        if not drawn_keys:
            continue
        fig = _new_figure(9.5, 5.0)
        ax = fig.add_subplot()
        values: List[float] = []
        job_handles = []
        for (job, series), color, label in zip(jobs, colors, labels):
            present = _present(series, keys)
            for key in present:
                xs, ys = zip(*series[key])
                values.extend(ys)
                ax.plot(xs, ys, color=color, alpha=0.9, **_style(key))
            if present:
                job_handles.append(Line2D([], [], color=color, linewidth=2, label=label))
        # a sweep over learning rates several decades apart: log axis, else the small ones lie flat on zero
        peaks = [max(v for _, v in s["lr"]) for _, s in jobs if s.get("lr")]
        _finish_axes(ax, figure, ylabel, values, log_y=figure == "lr" and _spans_decades(peaks))
        ax.set_title(f"{sweep_dir.resolve().name}: {ylabel} ({n} job{'s' if n != 1 else ''})")
        if len(job_handles) > MAX_LEGEND_JOBS:  # keep the legend readable: the first ones and a count
            more = len(job_handles) - (MAX_LEGEND_JOBS - 1)
            job_handles = job_handles[: MAX_LEGEND_JOBS - 1] + [
                Line2D([], [], linestyle="none", label=f"… and {more} more jobs")]
        if len(drawn_keys) > 1:  # which line style is which series (inside the axes)
            style_handles = [Line2D([], [], color="0.3", label=k, **_style(k)) for k in drawn_keys]
            ax.add_artist(ax.legend(handles=style_handles, fontsize="x-small", loc="best"))
        # the jobs, outside on the right; it is the axes' own legend, so bbox_inches="tight" makes room for it
        ax.legend(handles=job_handles, title="job", fontsize="x-small", title_fontsize="small",
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        written.append(_save(fig, sweep_dir / PLOTS_DIR / f"{figure}.png"))
    return written


# ----------------------------------------------------------------------------------------------- CLI
def _check(path: Path) -> bool:
    """Raise PlotError when path cannot be plotted; True when it is a run (has metrics.jsonl), False for a sweep."""
    if not path.exists():
        raise PlotError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise PlotError(f"{path}: not a directory; pass a run directory (with {METRICS_FILE}) or a sweep directory")
    if (path / METRICS_FILE).is_file():
        if not _has_data(read_metrics(path / METRICS_FILE)):
            raise PlotError(f"{path / METRICS_FILE}: no metrics to plot (empty, or no readable rows)")
        return True
    jobs = find_jobs(path)
    if not jobs:
        raise PlotError(f"{path}: no {METRICS_FILE} in it or below; pass a run directory or a sweep directory")
    if not any(_has_data(read_metrics(j / METRICS_FILE)) for j in jobs):
        raise PlotError(f"{path}: its {len(jobs)} {METRICS_FILE} files hold no metrics to plot")
    return False


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="trainrun-plots",
        description="Plot loss, accuracy and learning rate from metrics.jsonl into PATH/plots/. A run directory "
                    "gets its own plots; a sweep directory (e.g. multirun/<time>) gets every job overlaid, and each "
                    "job its own plots.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a run directory or a sweep directory")
    args = parser.parse_args(argv)

    def fail(msg: str, code: int = 2):
        print(f"trainrun-plots: error: {msg}", file=sys.stderr)
        sys.exit(code)

    try:  # every path checked before anything is written
        kinds = [(Path(p), _check(Path(p))) for p in args.paths]
    except PlotError as e:
        fail(str(e))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("matplotlib is not installed: pip install matplotlib")
    stdout_open = True

    def emit(files: List[Path]) -> None:
        nonlocal stdout_open
        for f in files:
            if stdout_open:
                try:
                    print(f, flush=True)
                except BrokenPipeError:  # `trainrun-plots ... | head`: stop printing, keep plotting
                    stdout_open = False
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    try:
        for path, is_run in kinds:
            if is_run:
                emit(plot_run(path))
            else:
                emit(plot_sweep(path))
                for job in find_jobs(path):
                    emit(plot_run(job))
    except OSError as e:
        fail(f"cannot write plots: {e}", code=1)


if __name__ == "__main__":
    main()
