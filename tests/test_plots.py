import os

os.environ["WANDB_MODE"] = "disabled"

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainrun import plots
from conftest import trainrun_process  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, steps: int = 20, eval_every: int = 5, evals: bool = True, ema: bool = False,
                  lr: float = 1e-3, extra_lines=()) -> Path:
    """Synthetic RunLogger output: a train row every step, an eval row every `eval_every` steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "time": 1000.0 + s, "epoch": s // 10, "train/loss": 2.3 * math.exp(-s / 8),
                     "train/acc": 1 - 0.9 * math.exp(-s / 6), "lr": lr * min(1.0, s / 4), "grad_norm": 1.0 / s,
                     "samples_per_s": 900.0})
        if evals and s % eval_every == 0:
            ev = {"step": s, "time": 1000.5 + s, "epoch": s // 10, "val/loss": 2.4 * math.exp(-s / 9),
                  "val/acc": 1 - 0.95 * math.exp(-s / 7)}
            if ema:
                ev.update({"val_raw/loss": 2.5 * math.exp(-s / 9), "val_raw/acc": 1 - math.exp(-s / 7)})
            rows.append(ev)
    lines = [json.dumps(r) for r in rows]
    for i, extra in extra_lines:
        lines.insert(i, extra)
    path = run_dir / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_png(path: Path):
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert 200 <= img.shape[0] <= 2000 and 300 <= img.shape[1] <= 3000, img.shape
    assert img.std() > 0.01  # not a blank canvas


def names(files):
    return sorted(Path(f).name for f in files)


def test_import_does_not_load_matplotlib():
    code = "import sys, trainrun.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plot_run_writes_three_pngs(tmp_path):
    run = tmp_path / "run1"
    write_metrics(run, ema=True)
    files = plots.plot_run(run)
    assert names(files) == ["accuracy.png", "loss.png", "lr.png"]
    for f in files:
        assert Path(f).parent == run / "plots"
        assert_png(Path(f))


def test_read_metrics_separates_train_and_eval_rows(tmp_path):
    path = write_metrics(tmp_path / "r", steps=20, eval_every=5)
    s = plots.read_metrics(path)
    assert len(s["train/loss"]) == 20 and len(s["lr"]) == 20
    assert [x for x, _ in s["val/acc"]] == [5, 10, 15, 20]
    assert "time" not in s and "step" not in s and "val_raw/acc" not in s


def test_run_without_eval_rows_still_gets_loss_and_lr(tmp_path):
    run = tmp_path / "noeval"
    write_metrics(run, evals=False)
    (run / "metrics.jsonl").write_text("\n".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "train/acc"})
        for line in (run / "metrics.jsonl").read_text().splitlines()) + "\n")  # no accuracy at all
    files = plots.plot_run(run)
    assert names(files) == ["loss.png", "lr.png"]
    assert not (run / "plots" / "accuracy.png").exists()
    for f in files:
        assert_png(Path(f))


def test_malformed_lines_are_skipped(tmp_path):
    run = tmp_path / "torn"
    bad = [(0, "{not json"), (3, "[1, 2, 3]"), (5, '{"step": "x", "train/loss": 1.0}'), (7, ""),
           (9, '{"train/loss": 5.0}')]
    path = write_metrics(run, steps=10, extra_lines=bad)
    with open(path, "a") as f:
        f.write('{"step": 11, "train/lo')  # a torn last line, as after a kill
    s = plots.read_metrics(path)
    assert [x for x, _ in s["train/loss"]] == list(range(1, 11))
    files = plots.plot_run(run)
    assert names(files) == ["accuracy.png", "loss.png", "lr.png"]
    for f in files:
        assert_png(Path(f))


def test_empty_or_garbage_file_returns_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plots.plot_run(empty) == []
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metrics.jsonl").write_text("nope\n\n{\n")
    assert plots.plot_run(garbage) == []
    assert not (empty / "plots").exists() and not (garbage / "plots").exists()


def test_repeated_step_keeps_last_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "lr": 0.2}\n{"step": 1, "lr": 0.1}\n{"step": 2, "lr": 0.3}\n')
    assert plots.read_metrics(path)["lr"] == [(1.0, 0.1), (2.0, 0.3)]


def make_sweep(root: Path, n: int = 3, labels: bool = True) -> Path:
    sweep = root / "multirun" / "2024-01-01_00-00-00"
    for i in range(n):
        job = sweep / str(i)
        write_metrics(job, steps=20, lr=10 ** -(i + 1))
        if labels:
            (job / "job_label.txt").write_text(f"optimizer.lr={10 ** -(i + 1)} seed={i}\n")
    return sweep


def test_plot_sweep_overlays_jobs(tmp_path):
    sweep = make_sweep(tmp_path, n=3)
    # a nested eval directory of a job is part of that job, not another job
    write_metrics(sweep / "0" / "eval" / "2024", steps=1, eval_every=1)
    assert [j.name for j in plots.find_jobs(sweep)] == ["0", "1", "2"]
    assert plots.job_label(sweep / "1", sweep) == "1: optimizer.lr=0.01 seed=1"
    files = plots.plot_sweep(sweep)
    assert names(files) == ["accuracy.png", "loss.png", "lr.png"]
    for f in files:
        assert Path(f).parent == sweep / "plots"
        assert_png(Path(f))


def test_sweep_labels_from_hydra_overrides_and_natural_order(tmp_path):
    sweep = make_sweep(tmp_path, n=12, labels=False)
    (sweep / "10" / ".hydra").mkdir()
    (sweep / "10" / ".hydra" / "overrides.yaml").write_text("- seed=10\n- optimizer.lr=0.1\n")
    assert [j.name for j in plots.find_jobs(sweep)][:3] == ["0", "1", "2"]
    assert [j.name for j in plots.find_jobs(sweep)][-2:] == ["10", "11"]
    assert plots.job_label(sweep / "10", sweep) == "10: seed=10 optimizer.lr=0.1"
    assert plots.job_label(sweep / "3", sweep) == "3"


def test_sweep_legend_shows_only_the_overrides_that_differ(tmp_path):
    sweep = tmp_path / "sweep"
    for lr in ("0.01", "0.001"):  # job directories named after their overrides (hydra.job.override_dirname)
        job = sweep / f"model=mlp,optimizer.lr={lr}"
        write_metrics(job)
        (job / "job_label.txt").write_text(f"model=mlp optimizer.lr={lr}\n")
    jobs = plots.find_jobs(sweep)
    assert plots._sweep_labels(jobs, sweep) == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert plots.job_label(jobs[0], sweep) == "model=mlp optimizer.lr=0.001"
    assert_png(plots.plot_sweep(sweep)[0])


def test_sweep_with_many_jobs_keeps_legend_short(tmp_path):
    sweep = make_sweep(tmp_path, n=25)
    files = plots.plot_sweep(sweep)
    assert names(files) == ["accuracy.png", "loss.png", "lr.png"]
    assert_png(sweep / "plots" / "loss.png")


def test_main_on_run_and_sweep(tmp_path, capsys):
    run = tmp_path / "single"
    write_metrics(run)
    sweep = make_sweep(tmp_path, n=2)
    plots.main([str(run), str(sweep)])
    printed = capsys.readouterr().out.split()
    expected = [run / "plots" / n for n in ("loss.png", "accuracy.png", "lr.png")]
    expected += [sweep / "plots" / n for n in ("loss.png", "accuracy.png", "lr.png")]
    expected += [sweep / j / "plots" / n for j in ("0", "1") for n in ("loss.png", "accuracy.png", "lr.png")]
    assert sorted(printed) == sorted(str(p) for p in expected)
    for p in expected:
        assert_png(p)


@pytest.mark.parametrize("case", ["missing", "no_metrics", "empty_metrics", "file"])
def test_main_bad_path_exits_2_with_one_line(tmp_path, capsys, case):
    good = tmp_path / "good"
    write_metrics(good)
    bad = tmp_path / case
    if case == "no_metrics":
        (bad / "sub").mkdir(parents=True)
    elif case == "empty_metrics":
        bad.mkdir()
        (bad / "metrics.jsonl").write_text("")
    elif case == "file":
        bad.write_text("x")
    with pytest.raises(SystemExit) as exc:
        plots.main([str(good), str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("trainrun-plots: error: ") and str(bad) in err
    assert not (good / "plots").exists()  # every path is checked before anything is written


def test_end_to_end_real_cli_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    p = trainrun_process(["trainer.max_steps=10", "trainer.eval_every=5", "model=mlp", "logger.progress=off",
                          "run_name=r"], tmp_path, env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    assert (run / "metrics.jsonl").is_file()
    plots.main([str(run)])
    for n in ("loss.png", "accuracy.png", "lr.png"):
        assert_png(run / "plots" / n)
