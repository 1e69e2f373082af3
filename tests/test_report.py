"""The per-run report (RUN/report.md, report.html): written at the end of a run, rewritten by trainrun-report."""
import json
import subprocess
import sys

from conftest import run_cli


def test_a_run_ends_with_a_report_a_person_can_read(tmp_path):
    run_cli(tmp_path, "run_name=r", "trainer.max_steps=6", "data.limit_train=320", "data.batch_size=32",
            "logger.progress=lines", "logger.log_every=3")
    run = tmp_path / "runs" / "r"
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    meta = json.loads((run / "checkpoints" / "step_000000006" / "meta.json").read_text())
    assert f"| val/acc | {meta['metrics']['val/acc']:.4g} |" in md and meta["sha256"] in md
    assert "| trainer.max_steps | 6 |" in md and meta["data"]["fingerprint"] in page
    for plot in ("loss", "accuracy", "lr", "confusion_matrix"):
        assert f"plots/{plot}.png" in md and (run / "plots" / f"{plot}.png").stat().st_size > 5000
    # mode=test's result joins the report when it is rewritten; the run's files are untrusted: values are escaped
    (run / "test.json").write_text(json.dumps({"metrics": {"test/acc": 0.5, "test/<b>x</b>": 1}}))
    p = subprocess.run([sys.executable, "-m", "trainrun.report", str(run)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    page = (run / "report.html").read_text()
    assert "test/acc" in (run / "report.md").read_text() and "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x" not in page


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trainrun.report", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("trainrun-report: error:") and p.stderr.count("\n") == 1
