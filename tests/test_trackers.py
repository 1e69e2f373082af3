"""TensorBoard and MLflow beside the console, several at once; a resumed run continues the same MLflow run; the
torch.profiler window (trainer.profile)."""
import json
import sys

import pytest

from conftest import run_cli

SMALL = ["data.limit_train=320", "data.batch_size=32", "logger.progress=lines", "logger.log_every=5",
         "logger.plots=false"]


def test_tensorboard_and_mlflow_together_and_across_a_resume(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    trackers = ["logger=mlflow", "logger.backends=[tensorboard]"]
    run_cli(tmp_path, "run_name=t", "trainer.max_steps=20", "trainer.stop_at_step=10", *trackers, *SMALL)
    run_cli(tmp_path, "resume=runs/t", *trackers, *SMALL[2:])
    run = tmp_path / "runs" / "t"
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("trainrun").experiment_id])
    assert len(runs) == 1, "the resume opened a second MLflow run"
    found = runs[0]
    meta = json.loads((run / "checkpoints" / "step_000000020" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == found.info.run_id and found.info.status == "FINISHED"
    sha = (run / "checkpoints" / "step_000000020" / "state.pt.sha256").read_text().split()[0]
    assert found.data.tags["checkpoint_sha256"] == sha and found.data.params["optimizer.name"] == "adamw"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [5, 10, 15, 20]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/acc")] == [10, 20]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]


def test_a_missing_tracker_package_or_unknown_backend_is_one_line(tmp_path, monkeypatch):
    from trainrun.errors import ConfigError
    from trainrun.logging import LoggerConfig, check
    from trainrun.trackers import open_trackers
    from conftest import structured

    with pytest.raises(ConfigError, match="'neptune' is not a tracker; choose from wandb, tensorboard, mlflow"):
        check(structured(LoggerConfig, backends=["neptune"]))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'trainrun\[mlflow\]'"):
        open_trackers(structured(LoggerConfig, name="mlflow"), tmp_path, {}, {})


def test_profiler_writes_a_trace_and_an_op_table(tmp_path):
    p = run_cli(tmp_path, "run_name=p", "trainer.profile=true", "trainer.profile_start=2", "trainer.profile_steps=3",
                "trainer.max_steps=6", *SMALL)
    out = tmp_path / "runs" / "p" / "profile"
    trace = next(out.glob("trainrun.*.pt.trace.json"))
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(1 for e in events if str(e.get("name", "")).startswith("ProfilerStep#")) == 3
    assert "aten::convolution" in (out / "ops.txt").read_text() and "profile: trace" in p.stdout
