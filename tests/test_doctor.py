"""The training doctor: NaN/inf guard, statistics, overfit-one-batch and the deliberate-failure presets."""
import json
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import FAST, read_jsonl, run_cli
from trainrun import checkpoint
from trainrun.config import DoctorConfig, PrecisionConfig
from trainrun.doctor import Doctor, TrainingHalted, locate_nonfinite, overfit_verdict
from trainrun.precision import PrecisionPolicy


def _doctor(model, precision="fp32", **cfg):
    pol = PrecisionPolicy(OmegaConf.merge(OmegaConf.structured(PrecisionConfig), {"name": precision,
                                                                                   **cfg.pop("prec", {})}),
                          torch.device("cpu"))
    doc_cfg = OmegaConf.merge(OmegaConf.structured(DoctorConfig), cfg)
    said = []
    doc = Doctor(doc_cfg, model, pol, nn.CrossEntropyLoss(), 3, say=said.append, lr=lambda: 0.1)
    return doc, pol, said


def _step(doc, pol, model, opt, x, y, step, loss_fn=None):
    opt.zero_grad(set_to_none=True)
    doc.begin_step(step)
    doc.check_labels(y, torch.arange(len(y)))
    doc.watch(x, y, torch.arange(len(y)))
    with pol.autocast():
        logits = model(x)
    loss = (loss_fn or nn.functional.cross_entropy)(logits.float(), y)
    pol.backward(loss)
    norm = pol.unscale_and_clip(opt, model.parameters(), clip_norm=None, clip_value=None, want_norm=True)
    apply = doc.end_step(loss.detach(), norm)
    pol.update(opt, apply)
    doc.after_update()
    return apply


class _SqrtAtZero(nn.Module):
    """Finite forward, infinite gradient: d sqrt(u)/du at u = 0."""

    def forward(self, x):
        return torch.sqrt(x - x.min().detach())


def test_locate_finds_the_layer_whose_gradient_goes_non_finite_and_leaves_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), _SqrtAtZero(), nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    bn_before = model[1].running_mean.clone()
    rng_before = torch.get_rng_state()
    found = locate_nonfinite(model, [(x, y)], nn.CrossEntropyLoss(), lambda: torch.autocast("cpu", enabled=False))
    assert found["forward_layer"] is None
    assert found["backward_layer"] == "2 (_SqrtAtZero)"
    assert "0.weight" in found["param_grads"] and "3.weight" not in found["param_grads"]
    assert torch.equal(model[1].running_mean, bn_before)  # the re-run does not move BatchNorm statistics
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in model.parameters())


def test_guard_names_bad_inputs_and_labels_with_their_sample_indices():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, _ = _doctor(model)
    x = torch.randn(6, 4)
    x[4, 1] = float("nan")
    with pytest.raises(TrainingHalted, match=r"non-finite values in the input batch at step 1.*samples \[4\]"):
        _step(doc, pol, model, opt, x, torch.zeros(6, dtype=torch.long), 1)
    doc, pol, _ = _doctor(model)
    with pytest.raises(TrainingHalted, match=r"labels outside \[0, 3\) at step 1.*sample 2: 7"):
        _step(doc, pol, model, opt, torch.randn(6, 4), torch.tensor([0, 1, 7, 2, 0, 1]), 1)


def test_skip_policy_skips_the_update_and_halts_after_too_many_in_a_row():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, said = _doctor(model, nan_guard="skip", max_consecutive_skips=2)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    assert _step(doc, pol, model, opt, x, y, 1)
    before = model.weight.detach().clone()
    bad = x.clone()
    bad[0, 0] = float("inf")
    assert not _step(doc, pol, model, opt, bad, y, 2)
    assert torch.equal(model.weight, before) and doc.skipped == [2]
    assert _step(doc, pol, model, opt, x, y, 3)  # a good step resets the count
    assert not _step(doc, pol, model, opt, bad, y, 4)
    with pytest.raises(TrainingHalted, match="2 bad steps in a row"):
        _step(doc, pol, model, opt, bad, y, 5)


def test_fused_check_catches_a_non_finite_gradient_behind_a_finite_loss_on_unlogged_steps():
    """Steps without a norm from the loop (not log steps) are checked by one fused inf/NaN test of the gradients:
    a NaN gradient with a finite loss is caught at its own step, reported with its norm, and the check's flag is
    cleared so the next healthy step goes through."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, said = _doctor(model, nan_guard="skip", max_consecutive_skips=3)
    poison = [False]
    model.weight.register_hook(lambda g: g * float("nan") if poison[0] else g)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def step(n):
        opt.zero_grad(set_to_none=True)
        doc.begin_step(n)
        doc.watch(x, y, torch.arange(len(y)))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        apply = doc.end_step(loss.detach(), None, None, list(model.parameters()))
        pol.update(opt, apply)
        doc.after_update()
        return apply, doc.step_loss

    assert step(1) == (True, pytest.approx(nn.functional.cross_entropy(model(x), y).item(), abs=1.0))
    before = model.weight.detach().clone()
    poison[0] = True
    applied, loss_v = step(2)
    assert not applied and math.isfinite(loss_v) and doc.skipped == [2]
    assert torch.equal(model.weight, before)
    assert any("non-finite gradient norm (nan)" in line for line in said), said
    poison[0] = False
    assert step(3)[0] and doc.skipped == [2]  # the flag was cleared
    assert [h[0] for h in doc.history] == [1, 3] and all(math.isnan(h[2]) for h in doc.history)


def test_gradients_the_fused_check_cannot_take_fall_back_to_the_norm():
    """Sparse gradients (nn.Embedding(sparse=True)) are not for the fused check: the plain norm decides."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(4, 3))
    doc, _, said = _doctor(model, nan_guard="skip")
    x, y = torch.randint(0, 10, (6, 1)), torch.randint(0, 3, (6,))
    verdicts = []
    for step in (1, 2, 3):
        for p in model.parameters():
            p.grad = None
        doc.begin_step(step)
        doc.watch(x, y, torch.arange(6))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step == 2:
            emb.weight.grad = emb.weight.grad * float("nan")
        verdicts.append(doc.end_step(loss.detach(), None, None, list(model.parameters())))
        doc.after_update()
    assert doc._found_inf is False and verdicts == [True, False, True] and doc.skipped == [2]
    assert any("non-finite gradient norm (nan)" in line for line in said), said


def test_fp16_scale_collapse_is_reported_as_such_with_bf16_advice():
    """Gradients that overflow fp16 even unscaled: GradScaler halves the scale every step until it is < 1."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, _ = _doctor(model, "fp16", prec={"init_scale": 8.0})
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    huge = lambda logits, y: logits.sum() * 1e5  # noqa: E731  (d loss / d logits = 1e5: inf once cast to fp16)
    with pytest.raises(TrainingHalted, match="fp16 loss-scale collapse at step 5.*use precision=bf16"):
        for step in range(1, 10):
            _step(doc, pol, model, opt, x, y, step, huge)
    assert doc.overflow_skips == 5  # scales 8, 4, 2, 1 overflowed, then 0.5 (< doctor.min_loss_scale) did too


def test_gradients_left_from_the_previous_step_are_caught():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, _ = _doctor(model)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    _step(doc, pol, model, opt, x, y, 1)
    with pytest.raises(TrainingHalted, match="zero_grad"):
        doc.begin_step(2)


@pytest.mark.parametrize("loss, finding", [(64 * math.log(3), "reduction_sum"), (math.log(3), None),
                                           (6 * math.log(3), "initial_loss_high")])
def test_first_loss_is_checked_against_ln_num_classes(loss, finding):
    doc, _, _ = _doctor(nn.Linear(4, 3))
    doc.batch_size = 64
    doc._check_initial_loss(loss)
    assert list(doc.findings) == ([finding] if finding else [])


def test_statistics_formulas():
    """Per-layer grad norms compose to the global norm; dead ReLU = units zero for the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # units 0 and 1 never fire
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    doc, pol, _ = _doctor(model, stats_every=1)
    rows = []
    doc._write_stats = rows.append
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    w_before = [p.detach().clone() for p in model.parameters()]
    _step(doc, pol, model, opt, x, y, 1)
    row = rows[0]
    layer_norms = {r["layer"]: r["grad_norm"] for r in row["layers"]}
    assert math.isclose(math.sqrt(sum(v * v for v in layer_norms.values())), row["grad_norm"], rel_tol=1e-5)
    assert row["activations"]["1"]["dead_frac"] == pytest.approx(2 / 5)
    ratio = math.sqrt(sum(float((p.detach() - w).norm()) ** 2 for p, w in zip(model[2].parameters(), w_before[2:])))
    ratio /= math.sqrt(sum(float(w.norm()) ** 2 for w in w_before[2:]))
    assert next(r for r in row["layers"] if r["layer"] == "2")["update_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_overfit_verdicts():
    v = overfit_verdict([2.3, 1.0, 0.04], [1, 1, 1], 0.05, {}, 1e-3)
    assert v["passed"] and not v["causes"]
    v = overfit_verdict([2.3, 40.0, 9.0, 2.2], [1, 1e3, 1, 1], 0.05, {}, 10.0)
    assert not v["passed"] and "learning rate is too high" in v["causes"][0]
    v = overfit_verdict([2.3] * 5, [0.0] * 5, 0.05, {}, 1e-3)
    assert "no gradient reaches the weights" in v["causes"][0]
    v = overfit_verdict([2.3, 1.5, 0.9], [1, 1, 1], 0.05, {}, 1e-3)
    assert "raise doctor.overfit_steps" in v["causes"][0]


# --- through the CLI --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, step, kind", [("4", 7, "BatchNorm2d"), ("0", 3, "Conv2d")])
def test_nan_injected_at_step_k_is_caught_at_step_k_in_the_right_layer(tmp_path, layer, step, kind):
    p = run_cli(tmp_path, f"doctor.inject_nan_step={step}", f"doctor.inject_nan_layer={layer}", "run_name=nan",
                "trainer.max_steps=12", *FAST, check=False)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert f"non-finite loss (nan) at step {step}; first non-finite layer: {layer} ({kind})" in err
    bad = tmp_path / "runs/nan/checkpoints" / f"step_{step:09d}.badstep"
    assert str(bad) in err
    state, meta = checkpoint.load(bad)  # SHA256-verified like any checkpoint
    assert state["trainer"]["step"] == step - 1  # the state before the bad update
    from trainrun.data import BatchStream, build_split
    from trainrun.config import DataConfig
    split = build_split(OmegaConf.structured(DataConfig))
    expected = BatchStream(split.train, 64, 0, shuffle=True, drop_last=True).batch_indices(0)[step - 1].tolist()
    assert state["badstep"]["batch_indices"] == [expected] == meta["badstep"]["batch_indices"]
    assert checkpoint.list_checkpoints(tmp_path / "runs/nan") == []  # never a resume candidate
    assert "hint:" in p.stdout and "first non-finite output: " + f"{layer} ({kind})" in p.stdout


def test_skip_policy_end_to_end(tmp_path):
    p = run_cli(tmp_path, "doctor.nan_guard=skip", "doctor.inject_nan_step=4", "doctor.inject_nan_layer=0",
                "run_name=s", "trainer.max_steps=10", *FAST)
    assert "the update was skipped" in p.stdout
    assert [r["step"] for r in read_jsonl(tmp_path / "runs/s/badsteps.jsonl")] == [4]
    rows = read_jsonl(tmp_path / "runs/s/metrics.jsonl")
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # the skipped step's forward left no NaN in BatchNorm's running statistics: evaluation stays finite
    assert math.isfinite([r for r in rows if "val/loss" in r][-1]["val/loss"])
    state, _ = checkpoint.load(tmp_path / "runs/s/checkpoints/step_000000004.badstep")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_statistics_at_an_interval(tmp_path):
    run_cli(tmp_path, "doctor.stats_every=5", "run_name=st", "trainer.max_steps=10", *FAST)
    rows = read_jsonl(tmp_path / "runs/st/stats.jsonl")
    assert [r["step"] for r in rows] == [1, 5, 10]
    layer = rows[-1]["layers"][0]
    assert {"grad_norm", "grad_abs_p50", "grad_abs_p90", "grad_abs_p99", "update_ratio"} <= set(layer)
    assert layer["grad_abs_p50"] <= layer["grad_abs_p90"] <= layer["grad_abs_p99"]
    relus = [a for a in rows[-1]["activations"].values() if "dead_frac" in a]
    assert len(relus) == 4 and all(0 <= a["dead_frac"] <= 1 for a in relus)
    scalars = [r for r in read_jsonl(tmp_path / "runs/st/metrics.jsonl") if "stats/grad_norm" in r]
    assert [r["step"] for r in scalars] == [1, 5, 10]


def test_overfit_batch_passes_on_a_healthy_model(tmp_path):
    p = run_cli(tmp_path, "mode=overfit_batch", "run_name=ok", *FAST)
    assert "overfit_batch PASSED" in p.stdout
    out = json.loads((tmp_path / "runs/ok/overfit_batch.json").read_text())
    assert out["passed"] and out["final_loss"] < 0.05 and out["steps"] < 300
    assert "optimizer.weight_decay: 0.01 -> 0.0" in p.stdout


# Each deliberate failure, and the message the doctor must give for it.
FAULTS = {
    "huge_lr": (["mode=overfit_batch", "doctor.overfit_steps=40"], 1, "learning rate too high"),
    "no_zero_grad": (["mode=overfit_batch"], 1, "gradients from the previous step were still in .grad"),
    "reduction_sum": (["mode=overfit_batch", "doctor.overfit_steps=20"], 1, "the loss is summed over the batch"),
    "fp16_no_scaler": (["mode=overfit_batch", "model=mlp", "doctor.overfit_steps=30"], None,
                       "fp16 gradient underflow at step 1"),
    "permuted_labels": (["trainer.max_steps=22", "trainer.eval_every=22"], 0,
                        "the training labels do not go with the inputs"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_deliberate_failure_is_diagnosed(tmp_path, fault):
    args, code, message = FAULTS[fault]
    p = run_cli(tmp_path, f"+fault={fault}", "run_name=f", *args, *FAST, check=False)
    if code is not None:
        assert p.returncode == code, p.stdout[-2000:] + p.stderr
    assert message in p.stdout, p.stdout[-3000:]
    if code == 1:
        assert message in p.stderr.strip().splitlines()[-1]  # the one-line error names the cause first
    for other in set(FAULTS) - {fault}:  # and no other fault's diagnosis is given
        assert FAULTS[other][2] not in p.stdout
