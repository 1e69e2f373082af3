"""resume=auto for requeued jobs (issue 17 item 1): the same command, run again after a kill, continues its run.

One shared end-to-end sequence (a module fixture): an uninterrupted synchronous reference run, then the same
`resume=auto` command with checkpoint.async_save=true three times, killed with SIGKILL and with SIGTERM at seeded
random steps; the refusals and the launcher config are checked in-process against the directory it leaves.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, CliProcess, cli_env, read_jsonl, sha_of, trainrun_process
from trainrun import checkpoint as ck

STEPS = 40
JOB_ID = "4242"  # the run is named after an environment variable, as run_name=${oc.env:SLURM_JOB_ID} names it
TRAIN = ["model=mlp", f"trainer.max_steps={STEPS}", "trainer.ckpt_every=4", *FAST]
AUTO = ["run_name=${oc.env:TRAINRUN_TEST_JOB_ID}", "resume=auto", "checkpoint.async_save=true", *TRAIN]


def _env():
    """Every command of this file runs in this environment: the first starts fresh, the rest are forked from one
    pre-imported Python (conftest.CliProcess, trainrun_process)."""
    return cli_env(TRAINRUN_TEST_JOB_ID=JOB_ID)


def _run(cwd: Path, *args: str):
    p = trainrun_process(args, cwd, _env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _latest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, ValueError, IndexError):
        return -1


def _launch_and_stop(cwd: Path, run: Path, target: int, sig: int, log: Path) -> int:
    """The auto command, stopped by `sig` once its latest checkpoint reaches `target`; returns its exit code."""
    proc = CliProcess(cwd, AUTO, env=_env(), log=log)
    deadline = time.monotonic() + 300  # a hang guard only
    while proc.poll() is None and _latest_step(run) < target and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {target}:\n{proc.stdout}{proc.stderr}"
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=120)


@pytest.fixture(scope="module")
def requeued(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("auto")
    _run(cwd, "run_name=ref", *TRAIN)  # uninterrupted, synchronous saves
    run, log = cwd / "runs" / JOB_ID, cwd / "auto.log"
    rng = random.Random(17)
    first, second = rng.randint(8, 16), rng.randint(20, 28)
    assert _launch_and_stop(cwd, run, first, signal.SIGKILL, log) == -signal.SIGKILL
    killed_at = int(ck.list_checkpoints(run)[-1].name[5:])  # the newest complete folder (latest may lag it)
    code = _launch_and_stop(cwd, run, second, signal.SIGTERM, log)
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    stopped_at = _latest_step(run)
    third = _run(cwd, *AUTO)
    return {"cwd": cwd, "run": run, "log": log.read_text(), "third": third.stdout, "killed_at": killed_at,
            "stopped_at": stopped_at}


def test_the_same_command_killed_twice_ends_with_the_uninterrupted_bytes_in_one_directory(requeued):
    cwd, run = requeued["cwd"], requeued["run"]
    assert 8 <= requeued["killed_at"] < requeued["stopped_at"] < STEPS
    assert sha_of(run, STEPS) == sha_of(cwd / "runs" / "ref", STEPS)  # async saves, two relaunches: same bytes
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == [JOB_ID, "ref"]
    log = requeued["log"]
    assert f"{JOB_ID}/checkpoints/{ck.step_name(requeued['killed_at'])} at step {requeued['killed_at']} " in log
    assert f"stopped at step {requeued['stopped_at']}/{STEPS}" in log
    assert "resumed from" in requeued["third"] and "trainrun: finished" in requeued["third"]
    size = (run / "checkpoints" / ck.step_name(STEPS) / ck.STATE).stat().st_size  # the space line, from the
    assert f"checkpoints: ~{ck._size(size + (64 << 10))} each, at most 4 at once = " in requeued["third"]  # resumed
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # each logged step once, across three processes
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_completed_run_says_so_and_exits_0(requeued):
    again = _run(requeued["cwd"], *AUTO)
    assert f"run already complete at step {STEPS}/{STEPS}; nothing to do" in again.stdout


def _preflight(capsys, *overrides, sweep=False):
    """trainrun's checks before Hydra starts, in-process: the one-line error, or '' when the command passes."""
    from trainrun.cli import preflight, setup

    setup()
    try:
        preflight(list(overrides), sweep=sweep)
    except SystemExit as e:
        assert e.code == 2
        return capsys.readouterr().err.strip()
    return ""


def test_refusals_still_apply_to_a_relaunch(requeued, capsys, monkeypatch):
    monkeypatch.chdir(requeued["cwd"])
    monkeypatch.setenv("TRAINRUN_TEST_JOB_ID", JOB_ID)
    assert _preflight(capsys, *AUTO) == ""
    err = _preflight(capsys, *[a for a in AUTO if a != "model=mlp"], "model=cnn")
    assert err.startswith("trainrun: error: resume refused: model.") and "the checkpoint was trained with" in err, err
    assert "\n" not in err


def test_auto_without_a_stable_name_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _preflight(capsys, "resume=auto", "model=mlp")
    assert err == ("trainrun: error: resume=auto needs run_name: it continues the run of that name if it has a "
                   "checkpoint and starts it otherwise; add run_name=NAME (under SLURM a name that survives a "
                   "requeue, e.g. 'run_name=${oc.env:SLURM_JOB_ID}')")
    err = _preflight(capsys, "resume=auto", "seed=0,1", sweep=True)
    assert err.endswith("(seed=0): resume=auto in a sweep (-m, a launcher such as +cluster=slurm) continues each "
                        "job in its folder of a named sweep: add sweep_name=NAME, the same at every launch")
    monkeypatch.delenv("TRAINRUN_UNSET_JOB_ID", raising=False)
    err = _preflight(capsys, "resume=auto", "run_name=${oc.env:TRAINRUN_UNSET_JOB_ID}")
    assert err.startswith("trainrun: error: ") and "TRAINRUN_UNSET_JOB_ID" in err and "\n" not in err
    monkeypatch.setenv("TRAINRUN_BAD_JOB_ID", "a/b")
    err = _preflight(capsys, "resume=auto", "run_name=${oc.env:TRAINRUN_BAD_JOB_ID}")
    assert "run_name='a/b' must be one folder name" in err
    err = _preflight(capsys, "run_name=${seed}")
    assert "it is an interpolation other than ${oc.env:VAR}" in err
    assert not (tmp_path / "runs").exists()


def test_the_slurm_launcher_config_composes(tmp_path, capsys, monkeypatch):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="trainrun"):
        cfg = compose("config", overrides=["+cluster=slurm", "sweep_name=exp1"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.resume == "auto" and launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0
    monkeypatch.chdir(tmp_path)
    assert _preflight(capsys, "+cluster=slurm", "sweep_name=exp1", "model=mlp", "seed=0,1", sweep=True) == ""
    assert "add sweep_name=NAME" in _preflight(capsys, "+cluster=slurm", "seed=0,1", sweep=True)


def test_a_stop_signal_is_handed_on_after_the_checkpoint():
    """Under submitit SIGUSR2 is its checkpoint-and-requeue handler: training takes the signal (checkpoint at the
    step boundary), and the handler it had runs afterwards (cli._hand_on_signal)."""
    from trainrun.cli import _hand_on_signal
    from trainrun.modes.train import StopFlag

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert stop.requested and stop.signum == signal.SIGUSR2 and calls == []
        _hand_on_signal({"signal": stop.signum, "handoff": stop.handoff})
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    with StopFlag() as stop:  # no Python handler before (the default action): nothing to hand on
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert stop.signum == signal.SIGTERM and stop.handoff is None


_HOLD = """
import sys, time
from pathlib import Path
from trainrun import rundir
rundir.lock(Path(sys.argv[1]), "run directory", "")
rundir.record_holder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_relaunch_while_the_run_is_live_is_refused(requeued, capsys, monkeypatch):
    """resume=auto picks the run's own directory, whose lock keeps a second live writer out (one line)."""
    from trainrun.cli import _lock_run_dir, _pick_run_dir

    monkeypatch.chdir(requeued["cwd"])
    picked = Path(_pick_run_dir("train", "auto", "runs", JOB_ID))
    assert picked.resolve() == requeued["run"].resolve()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(picked)], stdout=subprocess.PIPE, text=True,
                              env=_env(), start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            _lock_run_dir(picked)
        assert e.value.code == 2
        assert f"is in use by another trainrun process: PID {holder.pid}" in capsys.readouterr().err
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
