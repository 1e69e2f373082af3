"""User code through `_target_`, as a user types it: their model, data, loss and callbacks; exact resume of a
callback's state; one-line errors before compute; the trust rule for stored configs; provenance in meta.json."""
import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import trainrun_process, FAST

TESTS = Path(__file__).resolve().parent
USER_RUN = ["model._target_=userpkg.nets.TinyNet", "model.width=32", "data._target_=userpkg.data.digits_binary",
            "task=binary", "checkpoint.monitor=val/f1", "+callbacks.tally._target_=userpkg.callbacks.LossTally",
            "trainer.max_steps=24", "trainer.eval_every=8", "trainer.ckpt_every=8", "data.batch_size=32"]


def trainrun(cwd, *args, check=True, env=None):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    p = trainrun_process([*args, *FAST], cwd, env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def one_error_line(p, code=2):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("trainrun: error:"), p.stderr[-2000:]
    assert "train/loss" not in p.stdout
    return lines[0]


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory):
    """One run of user code: model, data, task and a stateful callback. (Exact resume of user code and of a
    callback's state: tests/test_examples.py, which stops and resumes the faces example.)"""
    root = tmp_path_factory.mktemp("user_runs")
    trainrun(root, "run_name=whole", *USER_RUN)
    return root, None


def test_the_callback_saw_every_step_and_evaluation(user_runs):
    root, _ = user_runs
    tally = json.loads((root / "runs/whole/tally.json").read_text())
    assert tally["steps"] == 24 and [step for step, _ in tally["evals"]] == [8, 16, 24]


def test_meta_json_records_every_target_with_its_source_sha256(user_runs):
    root, _ = user_runs
    meta = json.loads((root / "runs/whole/checkpoints/step_000000024/meta.json").read_text())
    code = meta["user_code"]
    assert set(code) == {"model", "data", "callbacks.tally"}
    nets = TESTS / "userpkg" / "nets.py"
    assert code["model"]["target"] == "userpkg.nets.TinyNet"
    assert Path(code["model"]["file"]) == nets
    assert code["model"]["sha256"] == hashlib.sha256(nets.read_bytes()).hexdigest()


def test_checkpoint_holds_the_callback_state_under_its_name(user_runs):
    import torch

    root, _ = user_runs
    state = torch.load(root / "runs/whole/checkpoints/step_000000016/state.pt", weights_only=True)
    assert list(state)[:7] == ["model", "optimizer", "schedule", "scaler", "trainer", "rng", "data"]
    assert state["callbacks"]["tally"]["steps"] == 16


def _forge_stored_target(ckpt: Path, key: str, target: str) -> None:
    """An attacker's edit: the stored config names other code, and the digests are rewritten to match."""
    meta = json.loads((ckpt / "meta.json").read_text())
    section, _, _ = key.partition(".")
    meta["config"]["resolved"][section]["_target_"] = target
    meta["config"]["unresolved"][section]["_target_"] = target
    (ckpt / "meta.json").write_text(json.dumps(meta))
    lines = [f"{hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}  {name}" for name in ("state.pt", "meta.json")]
    (ckpt / "state.pt.sha256").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("target", ["os.system", "userpkg.payload.net"])
def test_a_stored_config_never_imports_code_the_command_does_not_name(tmp_path, target):
    import shutil

    trainrun(tmp_path, "run_name=r", "model=mlp", "trainer.max_steps=6", "trainer.ckpt_every=3")
    for ckpt in (tmp_path / "runs/r/checkpoints").glob("step_*"):
        _forge_stored_target(ckpt, "model._target_", target)
    before = sorted(p.name for p in (tmp_path / "runs/r").rglob("*"))
    p = trainrun(tmp_path, "resume=runs/r", "trainer.max_steps=9", check=False,
                 env={"TRAINRUN_TEST_MARKER": str(tmp_path / "imported.marker")})
    line = one_error_line(p)
    assert f"names model._target_={target}, which this command does not" in line
    assert not (tmp_path / "imported.marker").exists()  # the module was never imported
    assert sorted(p.name for p in (tmp_path / "runs/r").rglob("*")) == before
    shutil.rmtree(tmp_path / "runs/r")


def test_a_callback_that_raises_ends_the_run_in_one_line_and_keeps_checkpoints(tmp_path):
    p = trainrun(tmp_path, "run_name=c", "model=mlp", "trainer.max_steps=20", "trainer.ckpt_every=5",
                 "+callbacks.boom._target_=userpkg.callbacks.Explodes", "+callbacks.boom.at_step=12", check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("trainrun: error: callback boom (userpkg.callbacks.Explodes) failed in on_step_end: "
                               "RuntimeError: boom at step 12"), lines[0]
    saved = sorted(d.name for d in (tmp_path / "runs/c/checkpoints").glob("step_*"))
    assert saved == ["step_000000005", "step_000000010"]
    ok = trainrun(tmp_path, "resume=runs/c", "trainer.max_steps=20", "+callbacks.boom=null")  # switched off
    assert "resumed from" in ok.stdout and "step_000000010" in ok.stdout


@pytest.mark.parametrize("args,words", [
    (["model._target_=userpkg.nope.Net"], ["model._target_=userpkg.nope.Net cannot be imported"]),
    (["model._target_=userpkg.nets.TinyNet", "+model.depth_of_field=3"], ["depth_of_field"]),
    (["model._target_=userpkg.nets.wrong_head"], ["returns (1, 7), not [1, 10]"]),
    (["data._target_=userpkg.data.not_a_dataset"], ["data._target_=userpkg.data.not_a_dataset"]),
    (["data._target_=userpkg.data.iterable"], ["IterableDataset", "resume"]),
    (["task=regression", "checkpoint.monitor=val/r2"], ["task=regression needs real-valued (float) targets"]),
    (["+callbacks.x=3"], ["callbacks.x"]),
])
def test_user_code_errors_are_one_line_before_compute(tmp_path, args, words):
    p = trainrun(tmp_path, "run_name=e", "trainer.max_steps=3", *args, check=False)
    line = one_error_line(p)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "runs/e/checkpoints").exists()
