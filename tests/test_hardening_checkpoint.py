"""Issue 12, items 6, 7, 8 (truncated meta.json), 9, 10, 11: everything a checkpoint folder holds is untrusted, and
a resume refuses what it cannot continue. Most tests edit a checkpoint of one small reference run and recompute its
digests (as a deliberate edit would), then resume it through the real CLI."""
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import FAST, read_jsonl, run_cli
from trainrun import checkpoint as ck
from trainrun.errors import CheckpointError, ConfigError

SHORT = ["trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.eval_every=3"]
STEP3, STEP6 = "step_000000003", "step_000000006"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    run_cli(root, "run_name=ref", *SHORT, *FAST)
    return root / "runs" / "ref"


@pytest.fixture
def run(reference, cli):
    dest = cli.dir / "runs" / "ref"
    shutil.copytree(reference, dest)
    return dest


def _state(ckpt: Path):
    return torch.load(ckpt / ck.STATE, weights_only=True)


def _meta(ckpt: Path):
    return json.loads((ckpt / ck.META).read_text())


def _rewrite(ckpt: Path, state=None, meta=None) -> None:
    """Write `state`/`meta` into the checkpoint and recompute every digest, as a deliberate edit would."""
    if state is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        (ckpt / ck.STATE).write_bytes(buf.getvalue())
    sha = hashlib.sha256((ckpt / ck.STATE).read_bytes()).hexdigest()
    meta = _meta(ckpt) if meta is None else meta
    meta["sha256"] = sha
    meta_bytes = json.dumps(meta).encode()
    (ckpt / ck.META).write_bytes(meta_bytes)
    (ckpt / ck.DIGEST).write_text(f"{sha}  {ck.STATE}\n{hashlib.sha256(meta_bytes).hexdigest()}  {ck.META}\n")


def _files(run: Path):
    return {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}


def _refused(p, *expected) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("trainrun: error: "), \
        (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stdout + p.stderr
    for word in expected:
        assert word in lines[0], lines[0]
    return lines[0]


# --- item 6: meta.json is covered by the digests and never resolved ------------------------------------------------

def test_manifest_lists_meta_and_an_edited_meta_is_refused(run, cli):
    ckpt = run / "checkpoints" / STEP6
    manifest = ck.digests(ckpt)
    assert set(manifest) == {ck.STATE, ck.META}
    assert manifest[ck.META] == hashlib.sha256((ckpt / ck.META).read_bytes()).hexdigest()
    original, meta = (ckpt / ck.META).read_bytes(), _meta(ckpt)
    meta["config"]["resolved"]["optimizer"]["lr"] = 0.5  # edited, digests left as they were
    (ckpt / ck.META).write_text(json.dumps(meta))
    before = _files(run)
    _refused(cli(f"resume={ckpt}", check=False), "failed its SHA256 check: meta.json (recorded")
    assert _files(run) == before
    # a file put into the folder after the save is refused too
    (ckpt / ck.META).write_bytes(original)
    (ckpt / "extra.bin").write_bytes(b"x")
    _refused(cli(f"resume={ckpt}", check=False), "holds 'extra.bin', a file its state.pt.sha256 does not list")


def test_stored_interpolations_stay_literal(run, cli):
    """'${oc.env:HOME}' in a stored config (saved resolved) is a literal string, not the home directory."""
    ckpt = run / "checkpoints" / STEP6
    meta = _meta(ckpt)
    meta["config"]["resolved"]["data"]["root"] = "${oc.env:HOME}"
    _rewrite(ckpt, meta=meta)
    cli(f"resume={run}", "trainer.max_steps=9")
    saved = _meta(run / "checkpoints" / "step_000000009")["config"]
    assert saved["resolved"]["data"]["root"] == "${oc.env:HOME}"
    assert str(Path.home()) not in json.dumps(saved) and "${oc.env:HOME}" in (run / "config.yaml").read_text()


def test_stored_decoder_is_not_run(run, cli):
    """'${oc.decode:"0.5"}' as the stored LR would have set lr=0.5; taken literally it is not a float: refused."""
    ckpt = run / "checkpoints" / STEP6
    meta = _meta(ckpt)
    meta["config"]["resolved"]["optimizer"]["lr"] = '${oc.decode:"0.5"}'
    _rewrite(ckpt, meta=meta)
    before = _files(run)
    _refused(cli(f"resume={ckpt}", check=False), "optimizer.lr", "edited")
    assert _files(run) == before


def test_checkpoint_without_meta_digest_still_loads(run, cli):
    """A checkpoint written before the manifest (state.pt.sha256 with the state's line only) still resumes."""
    ckpt = run / "checkpoints" / STEP6
    sha = ck.digests(ckpt)[ck.STATE]
    (ckpt / ck.DIGEST).write_text(f"{sha}  {ck.STATE}\n")
    assert ck.digests(ckpt) == {ck.STATE: sha}
    p = cli(f"resume={run}", "trainer.max_steps=9")
    assert "resumed from" in p.stdout and STEP6 in p.stdout
    state = bytearray((ckpt / ck.STATE).read_bytes())
    state[len(state) // 2] ^= 1
    (ckpt / ck.STATE).write_bytes(bytes(state))
    with pytest.raises(CheckpointError, match="SHA256"):
        ck.load(ckpt)


def test_manifest_leaves_state_bytes_alone(tmp_path):
    """state.pt is written exactly as before: its digest is the one its own line records, computed while writing."""
    d, sha = ck.save(tmp_path, 1, {"w": torch.arange(4.0)}, {"config": {}}, keep_last=1)
    buf = io.BytesIO()
    ck._save_uncrc(ck.canonical({"w": torch.arange(4.0)}), buf)
    assert (d / ck.STATE).read_bytes() == buf.getvalue() and hashlib.sha256(buf.getvalue()).hexdigest() == sha


# --- item 7: a state whose digests were recomputed is still checked value by value ------------------------------

def _wrong_shape(state):
    key = next(k for k, v in state["model"].items() if v.ndim == 2)
    state["model"][key] = state["model"][key][:, :-1].clone()


def _bad_torch_rng(state):
    state["rng"]["torch"] = state["rng"]["torch"][:100].clone()


def _bad_python_rng(state):
    state["rng"]["python"]["state"] = torch.zeros(3, dtype=torch.int64)


def _optimizer_shape(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(3, 3, 3)


@pytest.mark.parametrize("edit, expected", [
    (_wrong_shape, "has shape"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "model lacks"),
    (lambda s: s.pop("trainer"), "no 'trainer' entry"),
    (lambda s: s["trainer"].update(step=-5), "trainer step=-5"),
    (lambda s: s["trainer"].update(epoch="1"), "trainer epoch='1'"),
    (lambda s: s["trainer"].update(bogus=1), "unknown entry 'bogus'"),
    (_bad_torch_rng, "rng is not a random generator state"),
    (_bad_python_rng, "rng is not a valid random generator state"),
    (_optimizer_shape, "optimizer state exp_avg"),
    (lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])), "parameter groups"),
    (lambda s: s["scaler"].update(scale=-1.0), "scaler"),
], ids=["shape", "missing_key", "no_trainer", "negative_step", "str_epoch", "unknown_trainer_key", "torch_rng",
        "python_rng", "optimizer_shape", "optimizer_groups", "scaler"])
def test_edited_state_is_refused_in_one_line(run, cli, edit, expected):
    ckpt = run / "checkpoints" / STEP6
    state = _state(ckpt)
    edit(state)
    _rewrite(ckpt, state=state)
    before, rows = _files(run), read_jsonl(run / "metrics.jsonl")
    _refused(cli(f"resume={run}", check=False), "resume refused", expected)
    assert _files(run) == before and read_jsonl(run / "metrics.jsonl") == rows


def test_state_that_is_a_list_is_refused(run, cli):
    ckpt = run / "checkpoints" / STEP6
    _rewrite(ckpt, state=[1, 2, 3])
    _refused(cli(f"resume={ckpt}", check=False), "holds a list, not a trainrun state mapping")
    _refused(cli(f"resume={ckpt}", "mode=eval", check=False), "holds a list")


# --- item 8 (first half): a truncated meta.json in the newest checkpoint falls back, as a bad state.pt does ---------

def test_truncated_meta_falls_back_to_the_previous_checkpoint(run, cli):
    newest = run / "checkpoints" / STEP6
    text = (newest / ck.META).read_text()
    (newest / ck.META).write_text(text[: len(text) // 2])
    # named explicitly, the bad checkpoint is refused in one line
    _refused(cli(f"resume={newest}", check=False), "failed its SHA256 check", "meta.json")
    p = cli(f"resume={run}", "trainer.max_steps=9")
    assert f"resumed from {run / 'checkpoints' / STEP3}" in p.stdout.replace("\n", "") or \
        f"{STEP3} at step 3" in p.stdout, p.stdout[-3000:]
    assert "skipped a bad checkpoint" in p.stdout + p.stderr
    assert _meta(run / "checkpoints" / "step_000000009")["resumed_from"].endswith(STEP3)


# --- item 9: no model larger than the machine's memory is allocated -----------------------------------------------

def test_teacher_meta_describing_a_huge_model_is_refused_before_allocating(run, cli):
    ckpt = run / "checkpoints" / STEP6
    meta = _meta(ckpt)
    meta["config"]["resolved"]["model"].update(name="mlp", hidden_sizes=[10_000_000, 10_000_000])  # 400 TB
    _rewrite(ckpt, meta=meta)
    _refused(cli("distillation=response", f"distillation.teacher={run}", "trainer.max_steps=2", check=False),
             f"distillation.teacher={run}: model.name=mlp", "parameters", "GiB of weights alone, more than this")


def test_student_larger_than_memory_is_refused(cli):
    _refused(cli("model=mlp", "model.hidden_sizes=[1000000000,1000000000]", check=False), "model.name=mlp",
             "GiB of weights alone, more than this machine's")
    assert not list((cli.dir / "runs").rglob("state.pt"))


def test_check_model_size_counts_without_allocating():
    from trainrun.config import ModelConfig
    from trainrun.models import build_model, check_model_size, memory_bytes

    cfg = OmegaConf.structured(ModelConfig)
    assert check_model_size(cfg, (1, 8, 8), 10) == sum(p.numel() for p in build_model(cfg, (1, 8, 8), 10, 0.0)
                                                        .parameters())
    assert memory_bytes("cpu") > 0
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    check_model_size(OmegaConf.merge(cfg, {"name": "cnn"}), (3, 32, 32), 10)
    assert torch.equal(rng, torch.get_rng_state())  # the default run's random stream is untouched
    with pytest.raises(ConfigError, match="weights alone"):
        check_model_size(cfg, (1, 8, 8), 10**12)


# --- item 10: a resume that changes the model's shapes or the optimizer is refused, naming what changed -----------

def test_resume_with_another_optimizer_is_refused(run, cli):
    line = _refused(cli(f"resume={run}", "optimizer=sgd", check=False), "optimizer.name changed from 'adamw' to 'sgd'",
                    "resume with optimizer=adamw")
    assert "dampening" not in line


def test_optimizer_state_of_another_type_is_refused(run, cli):
    """A checkpoint whose recorded optimizer name says sgd but whose state is AdamW's (no 'dampening')."""
    ckpt = run / "checkpoints" / STEP6
    meta = _meta(ckpt)
    meta["config"]["resolved"]["optimizer"]["name"] = "sgd"
    _rewrite(ckpt, meta=meta)
    _refused(cli(f"resume={run}", "optimizer=sgd", check=False), "optimizer parameter group 0 lacks", "SGD")


def test_resume_with_changed_num_classes_is_refused(run, cli):
    _refused(cli(f"resume={run}", "data.num_classes=12", check=False), "has shape", "[12,",
             "this command changed data.num_classes from None to 12: resume with data.num_classes=null")


def test_resume_with_changed_input_shape_is_refused(cli, tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 4, 4), torch.arange(256) % 4
    torch.save({"x": x, "y": y}, tmp_path / "a.pt")
    torch.save({"x": torch.randn(256, 1, 5, 5), "y": y}, tmp_path / "b.pt")
    cli("run_name=t", "model=mlp", "data=tensors", "data.root=a.pt", "data.batch_size=32", *SHORT)
    _refused(cli("resume=runs/t", "data.root=b.pt", check=False), "has shape", "data.root")


# --- item 11: resume on changed data warns loudly, is recorded, and is refused under determinism=error -------------

def test_resume_on_changed_data(cli, tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 4, 4), torch.arange(256) % 4
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    cli("run_name=t", "data=tensors", "data.root=d.pt", "data.batch_size=32", *SHORT)
    old = _meta(tmp_path / "runs/t/checkpoints" / STEP6)["data"]["fingerprint"]
    x[0, 0, 0, 0] += 1.0  # one value of the file changes; the config does not
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    before = _files(tmp_path / "runs/t")
    _refused(cli("resume=runs/t", "determinism=error", check=False), "the data changed", old[:8], "determinism=error")
    assert _files(tmp_path / "runs/t") == before
    p = cli("resume=runs/t", "trainer.max_steps=9")
    warning = [line for line in p.stdout.splitlines() if line.startswith("warning: resume on changed data")]
    assert len(warning) == 1 and old[:8] in warning[0], p.stdout[-3000:]
    data = _meta(tmp_path / "runs/t/checkpoints/step_000000009")["data"]
    assert data["fingerprint_changed_from"] == old and data["fingerprint"] != old
