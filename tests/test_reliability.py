"""Fault tests through the real CLI: kill -9 at random points, corrupt checkpoints, a full disk during a save.

All three compare against one uninterrupted reference run: whatever happens on the way, the final checkpoint
must be bitwise the same (its SHA256), and the run directory must never hold a state that breaks a resume.
"""
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, CliProcess, read_jsonl, run_cli, sha_of
from trainrun import checkpoint as ck

# 30 steps, a checkpoint every step in the kill tests: the seeded kill points (steps 3, 6, 3 and 9) leave 20 or more
# steps of real work after them; the full-disk test saves at 10, fails at 20 and ends at 30
STEPS = 30
TRAIN = ["model=mlp", f"trainer.max_steps={STEPS}", *FAST]  # ~2 s of training on the real digits data
FINAL = ck.step_name(STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run that checkpoints every step: (its directory, the SHA256 of its final checkpoint)."""
    cwd = tmp_path_factory.mktemp("reference")
    run_cli(cwd, "run_name=ref", "trainer.ckpt_every=1", *TRAIN)
    run = cwd / "runs" / "ref"
    return run, sha_of(run, STEPS)


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


def _latest_step(run: Path) -> int:
    ptr = run / "checkpoints" / "latest"
    try:
        return _step(Path(ptr.read_text().strip()))  # replaced atomically: old or new name, never half
    except (OSError, ValueError, IndexError):
        return -1


def _assert_resumable(run: Path) -> Path:
    """`latest` names a complete, SHA-verified checkpoint; nothing at or after it is half written."""
    latest = ck.read_pointer(run, "latest")
    assert latest is not None, f"{run}: latest is missing or dangling"
    _, meta = ck.load(latest)  # verifies state.pt against state.pt.sha256 and meta.json
    assert meta["step"] == _step(latest)
    for c in ck.list_checkpoints(run):
        if _step(c) >= _step(latest):  # older ones may be mid-deletion by retention; never used before latest
            ck.load(c)
    return latest


def test_kill_9_at_random_points_then_resume_matches(reference, tmp_path):
    """SIGKILL once or twice per trial, mostly inside a checkpoint write (one per step); resume; same bytes."""
    _, ref_sha = reference
    rng = random.Random(20240808)
    args = ["trainer.ckpt_every=1", *TRAIN]
    kills_landed, mid_save = 0, 0
    for trial in range(3):
        name = f"k{trial}"
        run, log = tmp_path / "runs" / name, tmp_path / f"{name}.log"
        ckpts = run / "checkpoints"
        for k in range(2 if trial == 0 else 1):  # the first trial kills the resumed process again
            before = _latest_step(run)
            # the kill point is a random step (a point in the run, not a wall-clock time): mostly just after its
            # checkpoint write began (its temporary folder appeared), else a random moment after it completed
            target = rng.randint(before + 1, before + 12)
            in_save = rng.random() < 0.75
            delay = rng.uniform(0.0, 0.01 if in_save else 0.06)
            # forked from the pre-imported Python run_cli uses: a real process, killed as one, without the
            # ~6 s of imports per start (the kill point is a step, never a time)
            proc = CliProcess(tmp_path, [f"run_name={name}" if k == 0 else f"resume=runs/{name}", *args],
                              log=log)
            deadline = time.monotonic() + 300  # a hang guard only

            def reached() -> bool:
                return _latest_step(run) >= target or (in_save and ckpts.is_dir() and
                                                       any(ckpts.glob(f".tmp-{ck.step_name(target)}-*")))

            while proc.poll() is None and not reached() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills_landed += 1
            assert proc.wait(timeout=60) in (-signal.SIGKILL, 0), log.read_text()[-3000:]
            mid_save += any(ckpts.glob(f".tmp-step_*-{proc.pid}"))  # this process died inside a write
            _assert_resumable(run)
        p = run_cli(tmp_path, f"resume=runs/{name}", *args)
        assert "resumed from" in p.stdout or "already complete" in p.stdout
        assert sha_of(run, STEPS) == ref_sha, f"trial {trial}: resumed run differs from the uninterrupted one"
        assert _assert_resumable(run).name == FINAL
        # the killed writers' temporary folders are cleaned up by the next save; the log has each step once
        assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
        steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert kills_landed >= 3, "the runs finished before they could be killed"
    print(f"{kills_landed} kills landed, {mid_save} of them left a half-written checkpoint folder behind")


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(d: Path, tmp: Path) -> None:
    data = (d / ck.STATE).read_bytes()
    (d / ck.STATE).write_bytes(data[: len(data) // 2])


def _wrong_sha_file(d: Path, tmp: Path) -> None:
    (d / ck.DIGEST).write_text(f"{hashlib.sha256(b'something else').hexdigest()}  {ck.STATE}\n")


def _code_executing_pickle(d: Path, tmp: Path) -> None:
    """A real torch zip checkpoint whose pickle calls os.system, with consistent .sha256 and meta.json."""
    _Evil.marker = str(tmp / "pwned")
    buf = io.BytesIO()
    torch.save({"model": _Evil()}, buf)
    payload = buf.getvalue()
    sha = hashlib.sha256(payload).hexdigest()
    (d / ck.STATE).write_bytes(payload)
    (d / ck.DIGEST).write_text(f"{sha}  {ck.STATE}\n")
    meta = json.loads((d / ck.META).read_text())
    meta["sha256"] = sha
    (d / ck.META).write_text(json.dumps(meta))


# test_cli.py covers a bit flip already (explicit refusal, and resume=RUN_DIR skipping it). Here: the other kinds of
# damage, resume=latest skipping a bad checkpoint, and a skip past one that fails weights_only rather than its SHA;
# a wrong .sha256 takes the same skip path as the truncated file, so its fallback run is left out (None).
@pytest.mark.parametrize("corrupt, expected, fallback_spec", [
    (_truncate, "failed its SHA256 check", "latest"),
    (_wrong_sha_file, "failed its SHA256 check", None),
    (_code_executing_pickle, "cannot be loaded safely (weights_only)", "runs/ref"),
], ids=["truncated", "wrong_sha_file", "code_executing_pickle"])
def test_corrupt_checkpoint_refused_explicitly_and_skipped_by_run_resume(reference, tmp_path, corrupt, expected,
                                                                          fallback_spec):
    ref_run, ref_sha = reference
    run = tmp_path / "runs" / "ref"
    shutil.copytree(ref_run, run)
    bad = run / "checkpoints" / FINAL
    corrupt(bad, tmp_path)
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    p = run_cli(tmp_path, f"resume=runs/ref/checkpoints/{FINAL}", "trainer.ckpt_every=1", *TRAIN, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: checkpoint ") and expected in lines[0], p.stderr
    assert str(bad) in lines[0] or f"runs/ref/checkpoints/{FINAL}" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot  # nothing written or removed
    assert not (tmp_path / "pwned").exists()

    if fallback_spec is None:
        return
    # the run directory (or resume=latest) skips it with a warning, resumes the step before, and ends identical
    p = run_cli(tmp_path, f"resume={fallback_spec}", "trainer.ckpt_every=1", *TRAIN)
    out = p.stdout + p.stderr
    assert "skipped a bad checkpoint" in out and expected in out, out[-3000:]
    assert f"resumed from runs/ref/checkpoints/{ck.step_name(STEPS - 1)}" in p.stdout
    assert sha_of(run, STEPS) == ref_sha and _assert_resumable(run).name == FINAL
    assert not (tmp_path / "pwned").exists()


def _mount_tmpfs(mnt: Path, size: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up: {(r.stderr or r.stdout).strip()}")


def test_full_disk_during_save_fails_in_one_line_and_resumes(reference, tmp_path):
    if os.geteuid() != 0:  # not root: the same test as root of a user+mount namespace, if the kernel allows it
        if "TRAINRUN_IN_USERNS" in os.environ or subprocess.run(["unshare", "-rm", "true"],
                                                                capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root or unprivileged user namespaces (unshare -rm)")
        r = subprocess.run(["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"--basetemp={tmp_path / 'ns'}", f"{__file__}::{sys._getframe().f_code.co_name}"],
                           env={**os.environ, "TRAINRUN_IN_USERNS": "1"}, cwd=Path(__file__).parent,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        if " skipped" in r.stdout:
            pytest.skip(r.stdout.strip().splitlines()[-1])
        return

    ref_run, ref_sha = reference
    ckpt_bytes = sum(f.stat().st_size for f in (ref_run / "checkpoints" / FINAL).iterdir())
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _mount_tmpfs(mnt, "16m")
    try:
        # leave room for one checkpoint (plus the logs), not two: step 10 is saved, step 20 hits ENOSPC
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (free - int(1.3 * ckpt_bytes) - 192 * 1024))
        run = mnt / "runs" / "full"
        args = [f"output_root={mnt / 'runs'}", "trainer.ckpt_every=10", *TRAIN]
        p = run_cli(tmp_path, "run_name=full", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("trainrun: error: disk full"), p.stderr[-3000:]
        line = lines[0]
        for part in (str(run / "checkpoints" / ck.step_name(20)), "MiB free", "a checkpoint needs about",
                     f"previous checkpoint {ck.step_name(10)} is intact", "free disk space", f"resume={run}"):
            assert part in line, (part, line)
        # the previous checkpoint is intact and `latest` names it; no temporary folder is left behind
        assert _assert_resumable(run).name == ck.step_name(10)
        assert [c.name for c in ck.list_checkpoints(run)] == [ck.step_name(10)]
        assert not [c.name for c in (run / "checkpoints").iterdir() if c.name.startswith(".")]

        (mnt / "filler").unlink()  # space is freed: the run continues where it stopped and ends identical
        p = run_cli(tmp_path, f"resume={run}", *args)
        assert "at step 10 " in p.stdout
        assert sha_of(run, STEPS) == ref_sha and _assert_resumable(run).name == FINAL
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
