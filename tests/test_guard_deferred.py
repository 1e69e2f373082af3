"""doctor.guard_sync=deferred: the NaN guard's verdict read one step late (no per-step host sync on a GPU), the bad
update undone, and the diagnosis and .badstep dump equal to the step path's."""
import contextlib

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import FAST, run_cli, sha_of
from trainrun import checkpoint
from trainrun.config import DoctorConfig, PrecisionConfig
from trainrun.doctor import Doctor, TrainingHalted, check, guard_sync_mode
from trainrun.errors import ConfigError
from trainrun.precision import PrecisionPolicy


def _policy(name="fp32"):
    cfg = OmegaConf.merge(OmegaConf.structured(PrecisionConfig), {"name": name})
    return PrecisionPolicy(cfg, torch.device("cpu"))


def _doctor_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DoctorConfig), values)


def _armed_doctor(model, opt, **cfg):
    pol = _policy()
    doc = Doctor(_doctor_cfg(guard_sync="deferred", **cfg), model, pol, nn.CrossEntropyLoss(), 3,
                 say=lambda *_: None, lr=lambda: opt.param_groups[0]["lr"])
    doc.arm(opt, lambda position: contextlib.nullcontext(), ema=False)
    return doc, pol


def _deferred_step(doc, pol, model, opt, x, y, step):
    """One step as trainrun.loop.train_step orders it under guard_sync=deferred."""
    opt.zero_grad(set_to_none=True)
    doc.begin_step(step)
    doc.watch(x, y, torch.arange(len(y)))
    loss = nn.functional.cross_entropy(model(x).float(), y)
    pol.backward(loss)
    if doc.pending is not None:  # the previous step's verdict, read after this step's backward
        doc.resolve()
    norm = pol.unscale_and_clip(opt, model.parameters(), clip_norm=None, clip_value=None, want_norm=True)
    assert doc.end_step(loss.detach(), norm, (step - 1, 0, step, 8 * step))  # deferred: always applied
    pol.update(opt, True)
    doc.after_update()


def test_deferred_verdict_undoes_the_bad_update_weights_state_and_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    doc, pol = _armed_doctor(model, opt)
    assert doc.deferred
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for step in (1, 2):
        _deferred_step(doc, pol, model, opt, x, y, step)
    assert doc.pending["step"] == 2 and [h[0] for h in doc.history] == [1]  # step 2's verdict is still pending
    doc.resolve()
    assert [h[0] for h in doc.history] == [1, 2]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    bad = x.clone()
    bad[3, 1] = float("nan")
    _deferred_step(doc, pol, model, opt, bad, y, 3)  # the NaN update is applied for now...
    assert not torch.isfinite(model[0].weight).all() and not torch.isfinite(model[1].running_mean).all()
    with pytest.raises(TrainingHalted, match="non-finite values in the input batch at step 3"):
        _deferred_step(doc, pol, model, opt, x, y, 4)  # ...and undone when step 4 reads step 3's verdict
    for k, v in model.state_dict().items():  # weights and BatchNorm statistics as before step 3
        assert torch.equal(v, weights[k]), k
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, moments[k]), k


def test_a_bad_first_step_leaves_no_optimizer_state_behind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    doc, pol = _armed_doctor(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    x[0, 0] = float("inf")
    _deferred_step(doc, pol, model, opt, x, y, 1)
    assert len(opt.state) == 2  # SGD created its momentum buffers in the bad update
    with pytest.raises(TrainingHalted):
        doc.resolve()
    assert len(opt.state) == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_guard_sync_choices_and_refusals():
    pol = _policy()
    assert guard_sync_mode(_doctor_cfg(), pol, ema=False) == "step"  # auto on CPU: the checkpoints stay as they were
    assert guard_sync_mode(_doctor_cfg(guard_sync="deferred"), pol, ema=False) == "deferred"
    for cfg, prec, ema, what in [(_doctor_cfg(guard_sync="deferred", nan_guard="skip"), pol, False, "nan_guard=skip"),
                                 (_doctor_cfg(guard_sync="deferred"), _policy("fp16"), False, "GradScaler"),
                                 (_doctor_cfg(guard_sync="deferred"), pol, True, "EMA")]:
        with pytest.raises(ConfigError, match=f"doctor.guard_sync=deferred does not work with .*{what}"):
            guard_sync_mode(cfg, prec, ema)
    with pytest.raises(ConfigError, match="guard_sync"):
        check(_doctor_cfg(guard_sync="later"))


# --- through the CLI: the deferred path against the step path ---------------------------------------------------

def _nested_equal(a, b, path=""):
    """Every tensor, number and string of two checkpoint states equal (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _nested_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _nested_equal(u, v, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


def test_deferred_guard_trains_like_the_step_path_and_catches_step_k_with_its_dump(tmp_path):
    step, layer = 7, "4"
    errors, states = {}, {}
    for mode in ("step", "deferred"):
        p = run_cli(tmp_path, f"doctor.guard_sync={mode}", f"doctor.inject_nan_step={step}",
                    f"doctor.inject_nan_layer={layer}", f"run_name={mode}", "trainer.max_steps=12",
                    "trainer.ckpt_every=5", *FAST, check=False)
        assert p.returncode == 1, p.stderr
        errors[mode] = p.stderr.strip().splitlines()[-1].replace(f"/runs/{mode}/", "/runs/RUN/")
        states[mode], _ = checkpoint.load(tmp_path / f"runs/{mode}/checkpoints/step_{step:09d}.badstep")
    assert f"non-finite loss (nan) at step {step}; first non-finite layer: {layer} (BatchNorm2d)" in errors["deferred"]
    assert errors["deferred"] == errors["step"]
    assert states["deferred"]["trainer"]["step"] == step - 1
    _nested_equal(states["step"], states["deferred"])  # weights, optimizer, RNG, position, batch indices, report
    # the healthy steps before it trained bitwise alike: the step-5 checkpoints are the same bytes
    assert sha_of(tmp_path / "runs/step", 5) == sha_of(tmp_path / "runs/deferred", 5)
