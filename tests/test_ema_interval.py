"""EMA on an interval (regularization.ema_every, ema_adjust=reference) and the warmup's start factor
(schedule.warmup_start_factor), against torchvision's references/classification/train.py (its EMA class and decay
adjustment copied below by hand) and torch's LinearLR + CosineAnnealingLR; resume stays exact with ema_every > 1."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import sha_of, structured
from trainrun.config import RegularizationConfig, ScheduleConfig
from trainrun.errors import ConfigError
from trainrun.regularization import EMA, check as check_regularization, reference_ema_decay
from trainrun.schedule import Schedule, check as check_schedule


class ReferenceEMA(torch.optim.swa_utils.AveragedModel):
    """torchvision references/classification/utils.py ExponentialMovingAverage, as published."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def reference_decay(world_size, batch_size, model_ema_steps, epochs, model_ema_decay):
    """The reference's main(): the adjustment, line for line."""
    adjust = world_size * batch_size * model_ema_steps / epochs
    alpha = 1.0 - model_ema_decay
    alpha = min(1.0, alpha * adjust)
    return 1.0 - alpha


def test_reference_decay_adjustment_matches_the_reference_formula():
    # the ResNet-50 V2 command: 8 GPUs x 128, EMA every 32 steps, 600 epochs, --model-ema-decay 0.99998
    assert reference_ema_decay(0.99998, 8 * 128, 32, 600) == reference_decay(8, 128, 32, 600, 0.99998)
    assert reference_ema_decay(0.99998, 8 * 128, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600, rel=1e-12)
    assert reference_ema_decay(0.99, 256, 32, 2) == 0.0  # alpha capped at 1: the EMA is a copy of the weights


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _float_state(module):
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def test_reference_style_equals_torchvisions_averaged_model_bit_for_bit():
    """The reference loop: update when i % model_ema_steps == 0 within an epoch, reset n_averaged during the warmup
    epochs. With steps per epoch a multiple of the interval, trainrun's running count gives the same updates."""
    model = _tiny_model()
    steps_per_epoch, every, epochs, warmup_epochs, decay = 8, 4, 4, 1, 0.9
    ours = EMA(model, decay, warmup=False, every=every, reference_warmup_steps=warmup_epochs * steps_per_epoch)
    ref = ReferenceEMA(model, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ours.update()
            if i % every == 0:
                ref.update_parameters(model)
                if epoch < warmup_epochs:
                    ref.n_averaged.fill_(0)
            if epoch == 0 and i % every == 0:  # during the warmup both are copies of the weights
                assert all(torch.equal(v, model.state_dict()[k]) for k, v in _float_state(ours.module).items())
    assert ours.updates == epochs * steps_per_epoch // every and ours.averaged == int(ref.n_averaged)
    # integer buffers (BatchNorm's num_batches_tracked): trainrun copies them, the reference averages and truncates
    expected = _float_state(ref.module)
    got = _float_state(ours.module)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])  # it did average after the warmup


def test_trainrun_style_updates_on_the_interval_only():
    model = _tiny_model()
    every, decay = 3, 0.8
    ema = EMA(model, decay, warmup=True, every=every)
    expected = {k: v.clone() for k, v in _float_state(model).items()}
    updates = 0
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        ema.update()
        if (step - 1) % every == 0:  # steps 1, 4, 7
            d = min(decay, (1 + updates) / (10 + updates))
            expected = {k: e + (1 - d) * (model.state_dict()[k] - e) for k, e in expected.items()}
            updates += 1
        for k, v in _float_state(ema.module).items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
    assert (ema.updates, ema.steps) == (3, 7)


def test_from_config_maps_the_keys():
    model = _tiny_model()
    reg = structured(RegularizationConfig, ema_decay=0.99998, ema_every=32, ema_adjust="reference", ema_warmup=False)
    ema = EMA.from_config(model, reg, global_batch=1024, epochs=600.0, warmup_steps=6255)
    assert ema.decay == reference_decay(8, 128, 32, 600, 0.99998) and ema.every == 32
    assert ema.reference_warmup_steps == 6255 and not ema.warmup
    plain = EMA.from_config(model, structured(RegularizationConfig, ema_decay=0.9, ema_every=4), 1024, 600.0, 10)
    assert (plain.decay, plain.every, plain.warmup, plain.reference_warmup_steps) == (0.9, 4, True, None)
    assert EMA.from_config(model, structured(RegularizationConfig), 1024, 600.0, 10) is None


@pytest.mark.parametrize("values, pattern", [
    ({"ema_every": 0}, "regularization.ema_every=0: must be > 0"),
    ({"ema_adjust": "pycls"}, "regularization.ema_adjust='pycls': must be one of none, reference"),
    ({"ema_adjust": "reference"}, "regularization.ema_warmup=True: ema_adjust=reference warms"),
])
def test_bad_ema_keys_are_refused_in_one_line(values, pattern):
    with pytest.raises(ConfigError, match=pattern) as refused:
        check_regularization(structured(RegularizationConfig, **values))
    assert "\n" not in str(refused.value)


def _schedule(total, **values):
    return Schedule(structured(ScheduleConfig, **values), total, steps_per_epoch=10)


def test_warmup_start_factor_equals_linear_lr_then_cosine_annealing():
    """torchvision's --lr-warmup-method linear --lr-warmup-decay 0.01 then cosineannealinglr, stepped per step."""
    warmup, total, base = 7, 40, 0.5
    ours = _schedule(total, name="warmup_cosine", warmup_steps=warmup, warmup_start_factor=0.01)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)], milestones=[warmup])
    for t in range(total + 1):
        assert base * ours.multiplier(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), t
        opt.step()
        ref.step()
    assert ours.multiplier(0) == 0.01


def test_default_start_factor_keeps_todays_warmup_bit_for_bit():
    for name in ("warmup_cosine", "constant", "warmup_linear", "plateau"):
        s = _schedule(50, name=name, warmup_steps=9)
        assert [s.multiplier(t) for t in range(9)] == [t / 9 for t in range(9)], name


def test_warmup_start_factor_is_range_checked_and_refused_where_the_schedule_sets_its_own():
    for values, pattern in (({"warmup_start_factor": 1.5}, r"schedule.warmup_start_factor=1.5: must be in \[0, 1\]"),
                            ({"name": "wsd", "warmup_start_factor": 0.1}, "schedule=wsd sets where its warmup starts"),
                            ({"name": "onecycle", "warmup_start_factor": 0.1}, "schedule=onecycle sets")):
        with pytest.raises(ConfigError, match=pattern):
            check_schedule(structured(ScheduleConfig, **values))


# --- resume exactness, in-process ------------------------------------------------------------------------------

def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="ema_interval"):
        return compose("config", overrides=list(overrides))


def _run(overrides, run_dir):
    from trainrun.config import validate
    from trainrun.runner import run

    cfg = _compose([*overrides, "logger.progress=lines", "logger.plots=false"])
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    run(cfg, run_dir)


def test_resume_is_exact_with_ema_every_and_the_reference_warmup(tmp_path, monkeypatch):
    """Stopped mid-interval (step 5 of every 3) and inside the EMA's copy phase counters: the resumed run's last
    checkpoint (EMA weights, steps and n_averaged counters included) equals the uninterrupted one's."""
    monkeypatch.chdir(tmp_path)
    common = ["model=mlp", "data.batch_size=32", "data.limit_train=256", "data.limit_val=64", "trainer.max_steps=12",
              "trainer.ckpt_every=12", "trainer.eval_every=12", "regularization.ema_decay=0.99",
              "regularization.ema_every=3", "regularization.ema_adjust=reference", "regularization.ema_warmup=false",
              "schedule=warmup_cosine", "schedule.warmup_steps=4", "schedule.warmup_start_factor=0.01",
              "optimizer.lr=0.05"]
    _run([*common, "run_name=straight"], tmp_path / "runs/straight")
    _run([*common, "run_name=split", "trainer.stop_at_step=5"], tmp_path / "runs/split")
    _run([*common, "run_name=split", f"resume={tmp_path / 'runs/split'}"], tmp_path / "runs/split")
    assert sha_of(tmp_path / "runs/straight", 12) == sha_of(tmp_path / "runs/split", 12)
    state = torch.load(tmp_path / "runs/split/checkpoints/step_000000012/state.pt", weights_only=True)
    assert (state["ema"]["steps"], state["ema"]["updates"]) == (12, 4)
    # updates after steps 1 and 4 copy and reset (the 4 warmup steps), step 7 copies, step 10 averages
    assert state["ema"]["averaged"] == 2
