"""Issue 12, items 18-20, 25, 26, 32: unwritable output roots, a full disk anywhere, sweeps with typos or `/` in
values, signals and exit codes, Hydra's short flags. Through the real CLI where practical."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, CliProcess, cli_env, run_cli, trainrun_process
from trainrun import checkpoint as ck

SMALL = ["model=mlp", *FAST]


def _one_error_line(p, code=2):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: "), p.stderr[-3000:]
    return lines[0]


def _patched_cli(cwd: Path, patch: str, *args: str, timeout: int = 300):
    """The real CLI with one internal function patched (a fault injected at an exact point). Forked from the
    pre-imported Python like run_cli (each patch replaces a module attribute looked up at call time)."""
    code = f"import sys\n{patch}\nsys.argv = ['trainrun', *{list(args)!r}]\nfrom trainrun.cli import main\nmain()\n"
    return trainrun_process([], cwd, cli_env(), timeout, code=code)


# ---------------------------------------------------------------------------------------------------------------
# 32: every Hydra flag, long and short
# ---------------------------------------------------------------------------------------------------------------

def _hydra_option_strings():
    from hydra._internal.utils import get_args_parser

    return sorted(o for a in get_args_parser()._actions for o in a.option_strings)


@pytest.mark.parametrize("flag", _hydra_option_strings())
def test_every_hydra_flag_is_kept_out_of_the_overrides(flag):
    from trainrun.cli import split_args

    for given in ([flag, "seed=1"], [f"{flag}=x", "seed=1"]):
        overrides, flags = split_args(given)
        assert overrides == ["seed=1"] and flags == [given[0]], (given, overrides, flags)


@pytest.mark.parametrize("args,expect", [
    (["-sc", "install=bash"], "hydra_bash_completion"),  # what --hydra-help prints
    (["--shell-completion", "install=bash"], "hydra_bash_completion"),
    (["-i"], "Hydra 1."),
    (["--info", "config"], "Config"),
    (["-c", "job", "seed=3"], "seed: 3"),
])
def test_short_hydra_flags_reach_hydra(tmp_path, args, expect):
    p = run_cli(tmp_path, *args, check=False)
    assert p.returncode == 0 and "LexerNoViableAltException" not in p.stderr, p.stderr[-2000:]
    assert expect in p.stdout, p.stdout[-2000:]
    assert not (tmp_path / "runs").exists()


def test_run_flag_still_checks_the_config_first(tmp_path):
    line = _one_error_line(run_cli(tmp_path, "-r", "optimizer.lrr=0.1", check=False))
    assert "unknown config key 'optimizer.lrr'" in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# 20 / 25: sweeps
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expect", [
    (["optimizer.lrr=0.1,0.2"], "unknown config key 'optimizer.lrr'"),
    (["model=cnnn,mlp"], "unknown option model=cnnn: choose one of"),
    (["model=mlp,cnn", "optimizer.lr=0.1,-1"], "sweep job 2 of 4 (model=mlp optimizer.lr=-1): optimizer.lr=-1.0"),
])
def test_sweep_with_a_bad_override_fails_in_one_line_before_the_sweep(tmp_path, args, expect):
    line = _one_error_line(run_cli(tmp_path, "-m", *args, *FAST, check=False))
    assert expect in line, line
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "runs").exists()


def test_sweep_job_names_are_one_path_component():
    from trainrun.sweep import MAX_NAME_BYTES, job_dir_name

    assert job_dir_name("data.root=d1/x.pt,seed=0") == "data.root=d1%2Fx.pt,seed=0"
    assert job_dir_name("data.root=a%2Fb") != job_dir_name("data.root=a/b")  # no two values share a folder
    assert job_dir_name("") == "defaults" and job_dir_name("..") == "%2E%2E"
    long = job_dir_name("data.root=" + "/very/long/path" * 40)
    assert "/" not in long and len(long.encode()) <= MAX_NAME_BYTES
    assert long != job_dir_name("data.root=" + "/very/long/path" * 41)


def test_sweep_over_values_with_a_slash_keeps_every_job_in_the_summary(tmp_path):
    import torch

    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        g = torch.Generator().manual_seed(len(d))
        torch.save({"x": torch.randn(64, 1, 4, 4, generator=g), "y": torch.arange(64) % 2}, tmp_path / d / "x.pt")
    run_cli(tmp_path, "-m", "data=tensors", "data.root=d1/x.pt,d2/x.pt", "model=mlp", "trainer.max_steps=2",
            "data.batch_size=8", "sweep_name=s", *FAST)
    sweep = tmp_path / "multirun" / "s"
    jobs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and d.name != "plots")
    assert len(jobs) == 2 and all("data.root=d" in j and "%2Fx.pt" in j for j in jobs), jobs
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["n_jobs"] == 2 and summary["n_failed"] == 0, summary
    assert {" ".join(j["overrides"]).split("data.root=")[1].split()[0] for j in summary["jobs"]} == \
        {"d1/x.pt", "d2/x.pt"}


# ---------------------------------------------------------------------------------------------------------------
# 18: output_root that cannot be written
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("root", ["afile", "afile/runs"])
def test_output_root_that_is_a_file(tmp_path, root):
    (tmp_path / "afile").write_text("x")
    line = _one_error_line(run_cli(tmp_path, f"output_root={root}", *SMALL, check=False))
    assert line == (f"trainrun: error: output_root={root}: {tmp_path / 'afile'} is a file, not a directory; "
                    "set output_root to a directory you can write")
    assert (tmp_path / "afile").read_text() == "x"


def test_output_root_on_a_read_only_mount(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    r = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount: {r.stderr.strip()}")
    try:
        line = _one_error_line(run_cli(tmp_path, f"output_root={mnt}/runs", *SMALL, check=False))
        assert line == (f"trainrun: error: output_root={mnt}/runs: cannot write in {mnt} (a read-only file system); "
                        "set output_root to a directory you can write")
        assert list(src.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_output_root_without_write_permission(tmp_path, monkeypatch):
    # root passes permission checks, so the refusal path is reached by denying access() as a non-root user sees it
    from trainrun.cli import _check_writable
    from trainrun.errors import ConfigError

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"^output_root=x: cannot write in .* \(no write permission\); set"):
        _check_writable(tmp_path / "runs", "output_root=x", "set output_root to a directory you can write")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# 26: signals and exit codes
# ---------------------------------------------------------------------------------------------------------------

def _start_training(cwd: Path, *args: str) -> CliProcess:
    return CliProcess(cwd, ["run_name=sig", "trainer.max_steps=100000", "trainer.ckpt_every=100000", *SMALL,
                            "logger.log_every=1", *args])


def _wait_for_training(run: Path, proc: CliProcess, rows: int = 3) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= rows:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run did not start training: {proc.communicate()[1][-3000:]}")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_then_exits_128_plus_its_number(tmp_path, sig, code):
    run = tmp_path / "runs" / "sig"
    proc = _start_training(tmp_path)
    _wait_for_training(run, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, out[-2000:], err[-3000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainrun: stopped by {sig.name} at step "), err[-3000:]
    assert f"after a complete checkpoint (exit {code}); resume={run} continues" in lines[0]
    latest = ck.read_pointer(run, "latest")
    _, meta = ck.load(latest)  # complete and verified
    assert f"at step {meta['step']} " in lines[0]


def test_stop_at_step_is_a_success(tmp_path):
    p = run_cli(tmp_path, "run_name=s", "trainer.max_steps=20", "trainer.stop_at_step=3", *SMALL, check=False)
    assert p.returncode == 0 and "stopped by" not in p.stderr, p.stderr[-2000:]
    assert ck.read_pointer(tmp_path / "runs" / "s", "latest").name == ck.step_name(3)


def test_second_ctrl_c_during_a_checkpoint_write_ends_in_one_line(tmp_path):
    # The first Ctrl-C asks for a checkpoint; the second arrives while it is written (state.pt done, meta not yet).
    patch = ("import os, signal\nimport trainrun.checkpoint as c\n_orig, _n = c._save_uncrc, [0]\n"
             "def _save(obj, w):\n    _orig(obj, w)\n    _n[0] += 1\n    if _n[0] == 2:\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n        os.kill(os.getpid(), signal.SIGINT)\n"
             "c._save_uncrc = _save\n")
    run = tmp_path / "runs" / "cc"
    p = _patched_cli(tmp_path, patch, "run_name=cc", "trainer.max_steps=8", "trainer.ckpt_every=2", *SMALL)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 130, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert lines == [f"trainrun: interrupted by Ctrl-C; resume={run} continues from its latest complete "
                     "checkpoint"], p.stderr[-3000:]
    # the checkpoint being written is dropped whole; `latest` names the previous, complete one
    assert [c.name for c in ck.list_checkpoints(run)] == [ck.step_name(2)]
    assert ck.read_pointer(run, "latest").name == ck.step_name(2)
    ck.load(ck.read_pointer(run, "latest"))
    assert not [c.name for c in (run / "checkpoints").iterdir() if c.name.startswith(".")]
    p = run_cli(tmp_path, f"resume={run}", "trainer.max_steps=8", "trainer.ckpt_every=2", *SMALL)
    assert "at step 2 " in p.stdout and ck.read_pointer(run, "latest").name == ck.step_name(8)


# ---------------------------------------------------------------------------------------------------------------
# 19: a full disk anywhere (a real small tmpfs, filled to leave a chosen number of bytes)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {(r.stderr or r.stdout).strip()}")

    def leave(free_bytes: int) -> None:
        (mnt / "filler").unlink(missing_ok=True)
        st = os.statvfs(mnt)
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - free_bytes))

    leave.mnt = mnt
    yield leave
    subprocess.run(["umount", str(mnt)], capture_output=True)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _disk_args(mnt: Path, name: str, *more: str):
    return [f"output_root={mnt / 'runs'}", f"run_name={name}", "trainer.max_steps=6", *SMALL, *more]


NO_CHECKPOINT = ("no checkpoint was written yet; free disk space or set output_root to a larger disk, then run "
                 "the command again")


def test_full_disk_at_start_is_refused_before_anything_is_written(tmp_path, small_disk):
    small_disk(0)
    mnt = small_disk.mnt
    line = _one_error_line(run_cli(tmp_path, *_disk_args(mnt, "start"), check=False))
    assert line == (f"trainrun: error: output_root={mnt / 'runs'}: cannot write in {mnt} (disk full: no space left "
                    "on device); free disk space or set output_root to a directory you can write"), line
    # a sweep run from a full disk: the same, before Hydra writes its multirun.yaml
    line = _one_error_line(run_cli(mnt, "-m", "seed=0,1", *SMALL, check=False))
    assert line == (f"trainrun: error: the sweep directory multirun/: cannot write in {mnt} (disk full: no space "
                    "left on device); free disk space or run the sweep from a writable directory"), line
    assert sorted(f.name for f in mnt.iterdir()) == ["filler"]


@pytest.mark.parametrize("free,name,written", [
    (4096, "config", "config.yaml"),     # room for the lock's record only
    (12288, "metrics", "metrics.jsonl"),  # metrics.jsonl fills its first page mid-run
])
def test_full_disk_before_the_first_checkpoint_is_one_line_without_resume(tmp_path, small_disk, free, name,
                                                                           written):
    small_disk(free)
    run = small_disk.mnt / "runs" / name
    p = run_cli(tmp_path, *_disk_args(small_disk.mnt, name, "trainer.max_steps=60", "logger.log_every=1"),
                check=False)
    line = _one_error_line(p)
    assert line == (f"trainrun: error: disk full: could not write {run / written} (No space left on device; "
                    f"0.0 MiB free); {NO_CHECKPOINT}"), line
    assert not [f.name for f in run.iterdir() if f.name.endswith(".tmp")]


def test_full_disk_at_the_first_checkpoint_estimates_its_size(tmp_path, small_disk):
    small_disk(128 * 1024)
    run = small_disk.mnt / "runs" / "ck"
    line = _one_error_line(run_cli(tmp_path, *_disk_args(small_disk.mnt, "ck"), check=False))
    assert f"checkpoint {run / 'checkpoints' / ck.step_name(6)} (a checkpoint needs about " in line
    assert line.endswith(f"0.1 MiB free); {NO_CHECKPOINT}"), line
    need_mib = float(line.split("needs about ")[1].split(" MiB")[0])
    # as the advice says: space freed, the same command again completes; its checkpoint is the size announced
    small_disk(3 * 2**20)
    run_cli(tmp_path, *_disk_args(small_disk.mnt, "ck"))
    actual = sum(f.stat().st_size for f in (run / "checkpoints" / ck.step_name(6)).iterdir()) / 2**20
    assert abs(need_mib - actual) <= 0.1 * actual, (need_mib, actual)

    # a killed run's tail of metrics past its checkpoint, and one free block: a resume's trim_metrics writes the
    # kept rows, then cannot move the tail aside; nothing changes and no temporary file stays
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({"step": 7 + i, "train/loss": 1.0, "note": "x" * 200}) + "\n" for i in range(40))
    before = (run / "metrics.jsonl").read_bytes()
    small_disk(4096)
    line = _one_error_line(run_cli(tmp_path, f"resume={run}", *_disk_args(small_disk.mnt, "ck")[2:], check=False))
    assert line == (f"trainrun: error: disk full: could not write {run / 'metrics.jsonl'} (No space left on device; "
                    f"0.0 MiB free); metrics.jsonl and the checkpoints are unchanged; free disk space, then continue "
                    f"with resume={run}"), line
    assert (run / "metrics.jsonl").read_bytes() == before
    assert not (run / ".metrics.jsonl.tmp").exists() and not (run / "metrics.discarded.jsonl").exists()
    # and with no free block at all the resume is refused before it reads anything
    small_disk(0)
    line = _one_error_line(run_cli(tmp_path, f"resume={run}", *_disk_args(small_disk.mnt, "ck")[2:], check=False))
    assert line == (f"trainrun: error: resume={run}: cannot write in {run} (disk full: no space left on device); "
                    "free disk space or copy the run to a writable disk and resume it there"), line


def test_full_disk_while_plotting_warns_in_one_line_and_the_run_stands(tmp_path):
    patch = ("import errno\nimport matplotlib.figure as mf\n"
             "def _full(self, fname, *a, **k):\n    open(fname, 'wb').write(b'half a png')\n"
             "    raise OSError(errno.ENOSPC, 'No space left on device')\nmf.Figure.savefig = _full\n")
    args = ["run_name=pl", "trainer.max_steps=4", *[a for a in SMALL if a != "logger.plots=false"], "logger.plots=true"]
    p = _patched_cli(tmp_path, patch, *args)
    run = tmp_path / "runs" / "pl"
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.strip().splitlines() == [
        f"trainrun: warning: could not write the plots of {run} (No space left on device); the results and "
        f"checkpoints are complete; free disk space, then draw them with trainrun-plots {run}"], p.stderr[-3000:]
    assert not list((run / "plots").glob(".*.tmp"))
    ck.load(ck.read_pointer(run, "latest"))


def test_ctrl_c_before_training_ends_in_one_line(tmp_path):
    # Ctrl-C while the data is being prepared (no stop flag yet: Python's own KeyboardInterrupt)
    # A terminal's Ctrl-C: SIGINT at Python's default even when the test runner was started with it ignored (a
    # background job without job control inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler).
    patch = ("import os, signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "import trainrun.build as r\n_orig = r.build_split\n"  # build() loads the data
             "def _build(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    return _orig(*a, **k)\n"
             "r.build_split = _build\n")
    p = _patched_cli(tmp_path, patch, "run_name=early", *SMALL)
    assert p.returncode == 130, (p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.strip().splitlines() == [
        f"trainrun: interrupted by Ctrl-C; {tmp_path / 'runs' / 'early'} has no checkpoint yet"], p.stderr[-3000:]


def test_a_signal_ends_a_sweep_with_its_exit_code(tmp_path):
    proc = CliProcess(tmp_path, ["-m", "seed=0,1", "sweep_name=sw", "trainer.max_steps=100000",
                                 "trainer.ckpt_every=100000", *SMALL, "logger.log_every=1"])
    sweep, deadline = tmp_path / "multirun" / "sw", time.time() + 120
    while not list(sweep.glob("*seed=0*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.1)
    job = next(sweep.glob("*seed=0*/metrics.jsonl")).parent
    _wait_for_training(job, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, (proc.returncode, out[-2000:], err[-3000:])
    assert err.strip().splitlines() == [f"trainrun: sweep stopped by SIGUSR1 during job {job.name} (exit 138); re-run "
                                        "the same command to continue"], err[-3000:]
    assert not list(sweep.glob("*seed=1*"))


def test_full_disk_in_a_sweep_job_stops_the_sweep_in_one_line(small_disk):
    small_disk(128 * 1024)  # room for the sweep's files and the first job's logs, not its checkpoint
    mnt = small_disk.mnt
    p = run_cli(mnt, "-m", "seed=0,1", "sweep_name=full", "trainer.max_steps=4", *SMALL, check=False)
    line = _one_error_line(p)
    assert line.startswith("trainrun: error: sweep job ") and "seed=0" in line, line
    assert "failed: disk full: no space left to write checkpoint" in line, line
    assert line.endswith("the sweep stops here (re-running the same named sweep skips the jobs that completed)")
    assert not list((mnt / "multirun" / "full").glob("*seed=1*"))
