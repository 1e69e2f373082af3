"""Issue 12, items 1-5, 8 (best pointer) and 12: run directories are unique, locked, confined to output_root, and
resumed in place from their newest checkpoint whatever the pointers say; a refused command writes nothing.

Most tests go through the real CLI. Where a fault must land at an exact point (a kill between a checkpoint's
rename and the `latest` write, two runs in the same second), the CLI runs with one internal patched.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, read_jsonl, run_cli, sha_of
from trainrun import checkpoint as ck
from trainrun import rundir

MLP = ["model=mlp", *FAST]
LONG = ["model=mlp", "trainer.max_steps=100000", "logger.progress=lines", "logger.plots=false"]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # the same threads as run_cli: results depend on the count


def _patched(cwd: Path, prelude: str, *args: str, background: bool = False, log: Path = None):
    """`python -m trainrun ARGS` with `prelude` run first in the same process (to patch one internal)."""
    code = textwrap.dedent(prelude) + "\nimport sys\nfrom trainrun.cli import main\nsys.argv = ['trainrun'] + " \
        + repr(list(args)) + "\nmain()\n"
    cmd = [sys.executable, "-c", code]
    if background:
        with open(log, "a") as out:
            return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _popen(cwd: Path, args, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "trainrun", *args], cwd=cwd, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the background run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _snapshot(root: Path, lock: bool = True):
    """Every path under root with its bytes (without `.trainrun.lock`, which each accepted writer rewrites)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if lock or p.name != rundir.LOCK_FILE}


def _one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("trainrun: error: "), \
        f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return lines[0]


# ---- item 1: unique run directories -----------------------------------------------------------------------------

def test_claim_adds_a_suffix_on_collision(tmp_path):
    dirs = [rundir.claim(tmp_path / "runs", "2026-01-01_00-00-00") for _ in range(3)]
    assert [d.name for d in dirs] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-1", "2026-01-01_00-00-00-2"]
    assert all(d.is_dir() for d in dirs)


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    same_second = "import trainrun.cli\ntrainrun.cli._FIXED_NOW = '2026-01-01_00-00-00'\n"
    procs = [_patched(tmp_path, same_second, f"seed={seed}", "trainer.max_steps=6", *MLP, background=True,
                      log=tmp_path / f"{seed}.log") for seed in (1, 2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (tmp_path / "1.log").read_text()[-2000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-1"]
    seeds = set()
    for run in runs:
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
        seeds.add(seed)
        assert json.loads((ck.list_checkpoints(run)[-1] / ck.META).read_text())["seed"] == seed
        steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
        assert steps == sorted(set(steps)), f"{run.name}: two runs' metrics interleaved: {steps}"
    assert seeds == {1, 2}


# ---- item 2: one writer per run directory, sweep directory ------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from trainrun import rundir
rundir.lock(Path(sys.argv[1]), "run directory", "")
rundir.record_holder(Path(sys.argv[1]))  # as an accepted run does
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding the lock of `directory`, as a training run does."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_of_a_locked_run_is_refused_and_writes_nothing_then_kill9_frees_it(cli):
    cli("run_name=base", "trainer.max_steps=8", "trainer.stop_at_step=4", "model=mlp")
    run = cli.dir / "runs/base"
    holder = _hold_lock(run)
    try:
        before = _snapshot(cli.dir)
        for args in (["resume=runs/base"], ["run_name=base", "trainer.max_steps=8", "model=mlp"]):
            line = _one_error_line(cli(*args, check=False))
            assert f"run directory {run} is in use by another trainrun process: PID {holder.pid} on host " \
                   f"{socket.gethostname()}" in line, line
        assert _snapshot(cli.dir) == before  # not a byte written, trainrun.log included
    finally:
        _kill9(holder)
    p = cli("resume=runs/base")  # a lock left by a killed process never blocks
    assert "resumed from" in p.stdout and sha_of(run, 8)


def test_resume_while_the_run_trains_is_refused_and_kill9_then_resume_continues_in_place(cli, tmp_path):
    run, log = tmp_path / "runs/live", tmp_path / "live.log"
    proc = _popen(tmp_path, ["run_name=live", "trainer.ckpt_every=2", *LONG], log)
    try:
        _wait_for(lambda: len(ck.list_checkpoints(run)) >= 1, proc, log)
        line = _one_error_line(cli("resume=runs/live", check=False))
        assert f"PID {proc.pid} on host {socket.gethostname()}" in line, line
    finally:
        _kill9(proc)
    step = int(ck.list_checkpoints(run)[-1].name[5:])
    p = cli("resume=runs/live", f"trainer.stop_at_step={step + 2}")
    assert f"resumed from runs/live/checkpoints/{ck.step_name(step)}" in p.stdout
    assert ck.list_checkpoints(run)[-1].name == ck.step_name(step + 2)
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["live"]


def test_same_named_sweep_launched_twice_is_refused_before_writing(cli):
    sweep = cli.dir / "multirun/s"
    holder = _hold_lock(sweep)
    try:
        before = _snapshot(cli.dir)
        line = _one_error_line(cli("-m", "sweep_name=s", "seed=0,1", "trainer.max_steps=2", "model=mlp", check=False))
        assert f"sweep directory multirun/s is in use by another trainrun process: PID {holder.pid}" in line, line
        assert _snapshot(cli.dir) == before
    finally:
        _kill9(holder)


# ---- item 3: resuming a run directory continues in it, whatever the pointers say --------------------------------

_KILL_BEFORE_LATEST = """
import os, signal
from trainrun import checkpoint
def write_pointer(run_dir, name, ckpt_dir):
    os.kill(os.getpid(), signal.SIGKILL)  # after the checkpoint's rename, before `latest` names it
checkpoint.write_pointer = write_pointer
"""

TEN = ["trainer.max_steps=10", "trainer.ckpt_every=5", *MLP]


@pytest.fixture(scope="module")
def ref10(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ref10")
    run_cli(cwd, "run_name=ref", *TEN)
    return sha_of(cwd / "runs/ref", 10)


def test_killed_between_checkpoint_rename_and_latest_resumes_in_place(tmp_path, ref10):
    p = _patched(tmp_path, _KILL_BEFORE_LATEST, "run_name=k", *TEN)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    run = tmp_path / "runs/k"
    assert [c.name for c in ck.list_checkpoints(run)] == ["step_000000005"]
    assert not (run / "checkpoints/latest").exists()
    p = run_cli(tmp_path, "resume=runs/k", *FAST)
    assert "resumed from runs/k/checkpoints/step_000000005" in p.stdout
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["k"]  # no runs/k-from-step_* fork
    assert sha_of(run, 10) == ref10
    assert ck.read_pointer(run, "latest").name == "step_000000010"


@pytest.mark.parametrize("pointer", [None, "step_000000003", "step_000000005"],
                         ids=["deleted", "dangling", "stale"])
def test_missing_dangling_or_stale_latest_resumes_newest_checkpoint_in_place(tmp_path, pointer):
    run_cli(tmp_path, "run_name=d", "trainer.max_steps=15", "trainer.stop_at_step=10", "trainer.ckpt_every=5",
            "checkpoint.keep_last=5", *MLP)
    run = tmp_path / "runs/d"
    latest = run / "checkpoints/latest"
    latest.unlink()
    if pointer:
        latest.write_text(pointer + "\n")
    p = run_cli(tmp_path, "resume=runs/d", "trainer.stop_at_step=12", *FAST)
    assert "resumed from runs/d/checkpoints/step_000000010" in p.stdout, p.stdout[-2000:]
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["d"]  # no runs/d-from-step_* fork
    assert ck.read_pointer(run, "latest").name == "step_000000012"


def test_naming_the_newest_checkpoint_continues_an_older_one_branches(tmp_path):
    run_cli(tmp_path, "run_name=b", "trainer.max_steps=10", "trainer.ckpt_every=5", *MLP)
    (tmp_path / "runs/b/checkpoints/latest").unlink()
    assert ck.is_latest(tmp_path / "runs/b/checkpoints/step_000000010")
    assert not ck.is_latest(tmp_path / "runs/b/checkpoints/step_000000005")
    p = run_cli(tmp_path, "resume=runs/b/checkpoints/step_000000005", "trainer.stop_at_step=6", *FAST)
    branch = Path(p.stdout.split("run dir:")[1].split()[0])
    assert branch.name.startswith("b-from-step_000000005-")


# ---- item 4: names and pointers stay inside output_root and their run --------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "a/b", "..", "${oc.env:HOME}"])
def test_run_name_must_be_one_folder_under_output_root(cli, name):
    name = name.replace("ABSOLUTE", str(cli.dir / "abs_x"))
    line = _one_error_line(cli(f"run_name={name}", "trainer.max_steps=2", check=False))
    shown = os.environ["HOME"] if name == "${oc.env:HOME}" else name  # oc.env is allowed (SLURM_JOB_ID), then checked
    assert f"run_name={shown!r} must be one folder name under output_root" in line, line
    assert list(cli.dir.iterdir()) == [] and not (cli.dir.parent / "x").exists()


def test_sweep_name_must_be_one_folder_under_multirun(cli):
    line = _one_error_line(cli("-m", "sweep_name=../x", "seed=0,1", "trainer.max_steps=2", check=False))
    assert "sweep_name='../x' must be one folder name under multirun/" in line, line
    assert list(cli.dir.iterdir()) == [] and not (cli.dir.parent / "x").exists()


def test_pointer_outside_its_run_is_ignored(tmp_path):
    for name in ("a", "b"):
        for step in (1, 2):
            ck.save(tmp_path / "runs" / name, step, {"w": step}, {}, keep_last=5)
    a, b = tmp_path / "runs/a", tmp_path / "runs/b"
    junk = ["../../b/checkpoints/step_000000002", str(b / "checkpoints/step_000000002"), ".", "..", "",
            "step_000000002/..", "step_000000009", "checkpoints"]
    for text in junk:
        (a / "checkpoints/latest").write_text(text + "\n")
        assert ck.read_pointer(a, "latest") is None, text
    os.symlink(b / "checkpoints/step_000000002", a / "checkpoints/step_000000007")
    (a / "checkpoints/latest").write_text("step_000000007\n")
    assert ck.read_pointer(a, "latest") is None  # a symlink to another run's checkpoint
    (a / "checkpoints/step_000000007").unlink()
    (a / "checkpoints/latest").write_text("step_000000001\n")
    assert ck.read_pointer(a, "latest") == a / "checkpoints/step_000000001"


def test_forged_latest_pointing_into_another_run_does_not_continue_it(tmp_path):
    for name in ("A", "B"):
        run_cli(tmp_path, f"run_name={name}", "trainer.max_steps=10", "trainer.stop_at_step=5",
                "trainer.ckpt_every=5", *MLP)
    b = _snapshot(tmp_path / "runs/B")
    (tmp_path / "runs/A/checkpoints/latest").write_text("../../B/checkpoints/step_000000005\n")
    p = run_cli(tmp_path, "resume=runs/A", "trainer.stop_at_step=6", *FAST)
    assert "resumed from runs/A/checkpoints/step_000000005" in p.stdout
    assert ck.read_pointer(tmp_path / "runs/A", "latest").name == "step_000000006"
    assert _snapshot(tmp_path / "runs/B") == b


# ---- item 5: a run directory without a checkpoint starts over; config.yaml is always current ---------------------

def test_rerun_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    run, log = tmp_path / "runs/k", tmp_path / "k.log"
    proc = _popen(tmp_path, ["run_name=k", "seed=1", "logger.log_every=1", "trainer.ckpt_every=100000",
                             "trainer.eval_every=100000", *LONG], log)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_jsonl(run / "metrics.jsonl")) >= 3,
                  proc, log)
    finally:
        _kill9(proc)
    assert not ck.list_checkpoints(run)
    (run / "config.yaml").write_text("")  # killed while writing it
    p = run_cli(tmp_path, "run_name=k", "seed=2", "trainer.max_steps=6", *MLP)
    assert "started over" in p.stdout, p.stdout[-2000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["seed"] == 2 and cfg["trainer"]["max_steps"] == 6
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    # a resume that changes the config rewrites config.yaml too
    run_cli(tmp_path, "resume=runs/k", "trainer.max_steps=8", *FAST)
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 8


# ---- item 8 (second half): a junk `best` pointer ------------------------------------------------------------------

@pytest.mark.parametrize("junk", [".", "..", "nonsense", "../../x/checkpoints/step_000000001"])
def test_junk_best_pointer_is_treated_as_absent(tmp_path, junk):
    ck.save(tmp_path, 1, {"w": 1}, {}, keep_last=2, metric=0.5)
    (tmp_path / "checkpoints/best").write_text(junk + "\n")
    ck.save(tmp_path, 2, {"w": 2}, {}, keep_last=2, metric=0.1)
    assert ck.read_pointer(tmp_path, "best").name == "step_000000002"


def test_junk_best_pointer_does_not_break_the_next_save_of_a_resumed_run(cli):
    cli("run_name=j", "trainer.max_steps=10", "trainer.stop_at_step=5", "trainer.ckpt_every=5", "trainer.eval_every=5",
        "model=mlp")
    (cli.dir / "runs/j/checkpoints/best").write_text(".\n")
    cli("resume=runs/j")
    run = cli.dir / "runs/j"
    assert ck.read_pointer(run, "best") is not None and ck.read_pointer(run, "latest").name == "step_000000010"


# ---- item 12: a refused resume leaves the run's trainrun.log alone ------------------------------------------------

def test_refused_resume_does_not_append_to_the_run_log(cli):
    cli("run_name=base", "trainer.max_steps=8", "trainer.stop_at_step=4", "model=mlp")
    run = cli.dir / "runs/base"
    before = _snapshot(run, lock=False)
    p = cli("resume=runs/base", "data.batch_size=100000", check=False)
    assert "resume with a changed config: data.batch_size" in p.stdout  # refused after Hydra's logging started
    line = _one_error_line(p)
    assert "data.batch_size=100000" in line, line
    assert _snapshot(run, lock=False) == before
    cli("resume=runs/base", "optimizer.lr=0.002")
    assert "resume with a changed config: optimizer.lr" in (run / "trainrun.log").read_text()


def test_under_torchrun_every_rank_uses_the_directory_rank0_claimed(tmp_path):
    (tmp_path / "runs/2026-01-01_00-00-00").mkdir(parents=True)  # taken: rank 0 claims the -1 suffix
    script = tmp_path / "fixed_now.py"
    script.write_text("import trainrun.cli\ntrainrun.cli._FIXED_NOW = '2026-01-01_00-00-00'\ntrainrun.cli.main()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "trainer.device=cpu", "trainer.max_steps=4", *MLP]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-1"]
    run = tmp_path / "runs/2026-01-01_00-00-00-1"
    assert ck.list_checkpoints(run)[-1].name == "step_000000004" and (run / "config.yaml").is_file()
