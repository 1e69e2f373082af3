"""Hydra multirun sweeps: per-job results, the sweep summary, failures, and re-running an interrupted sweep."""
import csv
import json
import statistics

from conftest import run_cli

COMMON = ["model=mlp", "trainer.max_steps=8", "trainer.eval_every=4", "logger.progress=off"]


def _summary(tmp_path, name):
    d = tmp_path / "multirun" / name
    return d, json.loads((d / "summary.json").read_text())


def test_two_by_two_sweep_summary_groups_seeds(tmp_path):
    p = run_cli(tmp_path, "-m", *COMMON, "optimizer.lr=0.01,0.003", "seed=0,1", "sweep_name=grid")
    d, s = _summary(tmp_path, "grid")
    assert s["n_jobs"] == 4 and s["n_failed"] == 0
    jobs = {j["label"]: j for j in s["jobs"]}
    assert set(jobs) == {f"optimizer.lr={lr} seed={sd}" for lr in ("0.01", "0.003") for sd in (0, 1)}
    for label, j in jobs.items():  # every job has its own stable directory with its checkpoints
        job_dir = d / j["job"]
        assert (job_dir / "checkpoints" / "latest").is_file() and j["status"] == "completed"
        assert j["metrics"]["val/acc"] == json.loads((job_dir / "result.json").read_text())["metrics"]["val/acc"]
    groups = {g["group"]: g for g in s["groups"]}
    assert set(groups) == {"optimizer.lr=0.01", "optimizer.lr=0.003"}
    accs = [jobs[f"optimizer.lr=0.01 seed={sd}"]["metrics"]["val/acc"] for sd in (0, 1)]
    g = groups["optimizer.lr=0.01"]["final val/acc"]
    assert g["n"] == 2 and abs(g["mean"] - statistics.fmean(accs)) < 1e-12
    assert abs(g["std"] - statistics.stdev(accs)) < 1e-12
    rows = list(csv.DictReader(open(d / "summary.csv")))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert "grouped over seeds" in p.stdout and "mean" in p.stdout


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # a job that fails while training (a bad config value is refused before the sweep starts: test_hardening_*)
    p = run_cli(tmp_path, "-m", *COMMON, "doctor.inject_nan_layer=1", "doctor.inject_nan_step=0,3",
                "optimizer.lr=0.01,0.003", "sweep_name=bad", check=False)
    assert p.returncode == 1
    assert "2 sweep job(s) failed" in p.stderr
    d, s = _summary(tmp_path, "bad")
    status = {j["label"]: j for j in s["jobs"]}
    for lr in ("0.01", "0.003"):
        failed = status[f"doctor.inject_nan_step=3 optimizer.lr={lr}"]
        assert failed["status"] == "failed" and "non-finite loss (nan) at step 3" in failed["error"]
        assert status[f"doctor.inject_nan_step=0 optimizer.lr={lr}"]["status"] == "completed"


def test_rerunning_an_interrupted_sweep_skips_done_jobs_and_resumes_the_rest(tmp_path):
    # first invocation: every job stops at step 4 (as if the sweep was interrupted)
    run_cli(tmp_path, "-m", *COMMON, "seed=0,1", "sweep_name=again", "trainer.stop_at_step=4")
    d, s = _summary(tmp_path, "again")
    assert {j["status"] for j in s["jobs"]} == {"interrupted"}
    # second: the same sweep resumes both from their step-4 checkpoints
    p = run_cli(tmp_path, "-m", *COMMON, "seed=0,1", "sweep_name=again")
    assert p.stdout.count("resumed from") == 2 and "at step 4" in p.stdout
    d, s = _summary(tmp_path, "again")
    assert {j["status"] for j in s["jobs"]} == {"completed"}
    # the resumed jobs end exactly where uninterrupted ones do
    run_cli(tmp_path, "-m", *COMMON, "seed=0,1", "sweep_name=straight")
    for j in s["jobs"]:
        a = (d / j["job"] / "checkpoints/step_000000008/state.pt.sha256").read_text().split()[0]
        b = (tmp_path / "multirun/straight" / j["job"] / "checkpoints/step_000000008/state.pt.sha256").read_text().split()[0]
        assert a == b
    # third: nothing left to do
    p = run_cli(tmp_path, "-m", *COMMON, "seed=0,1", "sweep_name=again")
    assert p.stdout.count("already completed; skipped") == 2


def test_optuna_sweeper_searches_and_gets_the_metric(tmp_path):
    import yaml

    p = run_cli(tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize",
                "hydra.sweeper.sampler.seed=0", "optimizer.lr=tag(log, interval(1e-4, 1e-1))", *COMMON,
                "sweep_name=opt")
    d, s = _summary(tmp_path, "opt")
    assert s["n_jobs"] == 3 and s["n_failed"] == 0
    best = yaml.safe_load((d / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and "optimizer.lr" in best["best_params"]
    # the value optuna maximized is the job's best val/acc
    assert best["best_value"] == max(j["best"] for j in s["jobs"])
    assert "Best value" in p.stdout + p.stderr
