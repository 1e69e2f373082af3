"""Unit tests of the training techniques against formulas (SEED_NOTES.md) and torch reference implementations."""
import os

os.environ["WANDB_MODE"] = "disabled"

import io  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from trainrun.config import (InitConfig, OptimizerConfig, PrecisionConfig, RegularizationConfig,  # noqa: E402
                             ScheduleConfig, TrainrunConfig, validate)
from trainrun.errors import ConfigError  # noqa: E402
from trainrun.init import apply_init, zero_init_residual  # noqa: E402
from trainrun.optim import apply_hparams, build_optimizer, effective_lr, no_decay_names, param_groups  # noqa: E402
from trainrun.precision import PrecisionPolicy  # noqa: E402
from trainrun.regularization import build_loss  # noqa: E402
from trainrun.schedule import Schedule, resolve_warmup  # noqa: E402
from trainrun.seed import capture_rng_state, restore_rng_state  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------

def sched_cfg(**kw):
    cfg = OmegaConf.structured(ScheduleConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def hf_cosine(t, W, T):
    """transformers.get_cosine_schedule_with_warmup's lr_lambda (num_cycles=0.5)."""
    if t < W:
        return float(t) / float(max(1, W))
    progress = float(t - W) / float(max(1, T - W))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def hf_linear(t, W, T):
    """transformers.get_linear_schedule_with_warmup's lr_lambda."""
    if t < W:
        return float(t) / float(max(1, W))
    return max(0.0, float(T - t) / float(max(1, T - W)))


@pytest.mark.parametrize("W,T", [(0, 50), (10, 100), (7, 33), (100, 1000)])
def test_warmup_cosine_matches_transformers(W, T):
    s = Schedule(sched_cfg(name="warmup_cosine", warmup_steps=W), T, steps_per_epoch=10)
    assert s.warmup == W
    for t in range(T + 1):
        assert s.multiplier(t) == pytest.approx(hf_cosine(t, W, T), abs=1e-12), t
    # a few landmarks, so a wrong reference would be caught too
    assert s.multiplier(W) == pytest.approx(1.0)
    assert s.multiplier(T) == pytest.approx(0.0, abs=1e-12)
    assert s.multiplier(W + (T - W) // 2) == pytest.approx(0.5, abs=0.5 * math.pi / (T - W) + 1e-9)
    if W:
        assert s.multiplier(0) == 0.0
        assert s.multiplier(W // 2) == pytest.approx((W // 2) / W)


@pytest.mark.parametrize("W,T", [(0, 50), (10, 100), (7, 33), (100, 1000)])
def test_warmup_linear_matches_transformers(W, T):
    s = Schedule(sched_cfg(name="warmup_linear", warmup_steps=W), T, steps_per_epoch=10)
    for t in range(T + 1):
        assert s.multiplier(t) == pytest.approx(hf_linear(t, W, T), abs=1e-12), t
    assert s.multiplier(T) == pytest.approx(0.0, abs=1e-12)


def test_schedule_stays_at_end_value_past_total():
    cos = Schedule(sched_cfg(name="warmup_cosine", warmup_steps=5), 50, 10)
    lin = Schedule(sched_cfg(name="warmup_linear", warmup_steps=5), 50, 10)
    for t in (50, 51, 75, 200):
        assert cos.multiplier(t) == pytest.approx(0.0, abs=1e-12)
        assert lin.multiplier(t) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_linear"])
def test_min_lr_ratio(name):
    W, T, r = 10, 110, 0.1
    s = Schedule(sched_cfg(name=name, warmup_steps=W, min_lr_ratio=r), T, 10)
    ref = hf_cosine if name == "warmup_cosine" else hf_linear
    for t in range(W, T + 1):
        # transformers' *_with_min_lr variant: factor * (1 - min_ratio) + min_ratio
        assert s.multiplier(t) == pytest.approx(r + (1 - r) * ref(t, W, T), abs=1e-12)
    assert s.multiplier(T) == pytest.approx(r)
    assert s.multiplier(W) == pytest.approx(1.0)
    # warmup itself still starts at 0, not at min_lr_ratio
    assert s.multiplier(0) == 0.0
    assert min(s.multiplier(t) for t in range(W, T + 1)) == pytest.approx(r)


def _dummy_optimizer(lr=1.0):
    p = nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([p], lr=lr)


@pytest.mark.parametrize("step_size,gamma", [(7, 0.1), (10, 0.5), (1, 0.9)])
def test_step_schedule_matches_torch_steplr(step_size, gamma):
    base = 0.3
    opt = _dummy_optimizer(base)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    s = Schedule(sched_cfg(name="step", step_size=step_size, gamma=gamma), 60, 10)
    for t in range(60):
        assert base * s.multiplier(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), t
        opt.step()
        ref.step()


@pytest.mark.parametrize("fractions,T", [([0.3, 0.6, 0.9], 100), ([0.25, 0.5], 37), ([0.5], 11)])
def test_multistep_schedule_matches_torch_multisteplr(fractions, T):
    base, gamma = 0.2, 0.1
    opt = _dummy_optimizer(base)
    milestones = [int(round(f * T)) for f in fractions]
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma)
    s = Schedule(sched_cfg(name="multistep", milestones=fractions, gamma=gamma), T, 10)
    assert s.milestones == milestones
    for t in range(T + 5):
        assert base * s.multiplier(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), t
        opt.step()
        ref.step()
    # and the decay really happened (÷10 per milestone)
    assert s.multiplier(T) == pytest.approx(gamma ** len(fractions))


def test_constant_schedule_with_warmup():
    s = Schedule(sched_cfg(name="constant", warmup_steps=4), 20, 5)
    assert [s.multiplier(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert s.multiplier(19) == 1.0


def test_warmup_resolution():
    assert resolve_warmup(sched_cfg(warmup_steps=17), 1000, 50) == 17
    assert resolve_warmup(sched_cfg(warmup_fraction=0.02), 100_000, 50) == 2000
    assert resolve_warmup(sched_cfg(warmup_fraction=0.1), 95, 50) == 10  # round(9.5) -> banker's 10
    assert resolve_warmup(sched_cfg(warmup_fraction=0.1), 33, 50) == 3
    assert resolve_warmup(sched_cfg(warmup_epochs=2.0), 1000, 50) == 100
    assert resolve_warmup(sched_cfg(warmup_epochs=0.5), 1000, 30) == 15
    assert resolve_warmup(sched_cfg(), 1000, 50) == 0
    # never longer than the run
    assert resolve_warmup(sched_cfg(warmup_steps=500), 100, 50) == 100
    assert resolve_warmup(sched_cfg(warmup_epochs=10.0), 100, 50) == 100
    s = Schedule(sched_cfg(name="warmup_cosine", warmup_epochs=1.0), 200, 40)
    assert s.warmup == 40
    assert s.multiplier(20) == pytest.approx(0.5)
    assert s.multiplier(40) == pytest.approx(1.0)


def test_schedule_apply_sets_every_group_lr():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ocfg = OmegaConf.structured(OptimizerConfig)
    ocfg.lr, ocfg.weight_decay = 0.5, 0.1
    opt = build_optimizer(model, ocfg, 64)
    assert len(opt.param_groups) == 2
    s = Schedule(sched_cfg(name="warmup_linear", warmup_steps=10), 110, 10)
    m = s.apply(opt, 5)
    assert m == pytest.approx(0.5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.25)
        assert g["base_lr"] == pytest.approx(0.5)
    s.apply(opt, 60)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

def opt_cfg(**kw):
    cfg = OmegaConf.structured(OptimizerConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 3)


def _ids(ps):
    return {id(p) for p in ps}


def test_no_weight_decay_on_norm_and_bias():
    model = _BNNet()
    cfg = opt_cfg(name="adamw", lr=1e-3, weight_decay=0.05)
    groups = param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert _ids(by_name["decay"]["params"]) == _ids([model.conv.weight, model.fc.weight])
    assert _ids(by_name["no_decay"]["params"]) == _ids(
        [model.bn.weight, model.bn.bias, model.ln.weight, model.ln.bias, model.emb.weight, model.fc.bias])
    assert no_decay_names(model) == {"bn.weight", "bn.bias", "ln.weight", "ln.bias", "emb.weight", "fc.bias"}

    opt = build_optimizer(model, cfg, 64)
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}
    # every trainable parameter is in exactly one group
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def test_no_decay_with_sequential_bn_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    opt = build_optimizer(model, opt_cfg(name="sgd", lr=0.1, weight_decay=1e-4), 32)
    decay = next(g for g in opt.param_groups if g["decay"])
    no_decay = next(g for g in opt.param_groups if not g["decay"])
    assert _ids(decay["params"]) == _ids([model[0].weight, model[3].weight])
    assert _ids(no_decay["params"]) == _ids([model[0].bias, model[1].weight, model[1].bias, model[3].bias])
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0


def test_decay_everywhere_when_switched_off():
    model = _BNNet()
    opt = build_optimizer(model, opt_cfg(weight_decay=0.05, no_decay_norm_bias=False), 64)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_adamw_hparams_applied():
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, opt_cfg(name="adamw", lr=3e-4, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.1), 64)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(3e-4)
        assert tuple(g["betas"]) == (0.8, 0.95)
        assert g["eps"] == 1e-6
    # torch's AdamW default decay (0.01) must not leak into the no-decay group
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.1, "no_decay": 0.0}


def test_adamw_zero_weight_decay_is_zero():
    opt = build_optimizer(nn.Linear(4, 2), opt_cfg(name="adamw", weight_decay=0.0), 64)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_sgd_hparams_applied():
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, opt_cfg(name="sgd", lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-4), 64)
    assert isinstance(opt, torch.optim.SGD)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1)
        assert g["momentum"] == 0.8
        assert g["nesterov"] is True
    adam = build_optimizer(model, opt_cfg(name="adam", lr=1e-3), 64)
    assert type(adam) is torch.optim.Adam


def test_linear_scaling_rule():
    cfg = opt_cfg(lr=0.1, scale_lr_with_batch=True, reference_batch_size=256)
    assert effective_lr(cfg, 512) == pytest.approx(0.2)
    assert effective_lr(cfg, 64) == pytest.approx(0.025)
    opt = build_optimizer(nn.Linear(2, 2), cfg, 1024)
    assert all(g["lr"] == pytest.approx(0.4) and g["base_lr"] == pytest.approx(0.4) for g in opt.param_groups)
    cfg.scale_lr_with_batch = False
    assert effective_lr(cfg, 1024) == pytest.approx(0.1)


def test_apply_hparams_after_load_state_dict_restores_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    old = build_optimizer(model, opt_cfg(name="adamw", lr=0.1, weight_decay=0.2, betas=[0.5, 0.6]), 64)
    model(torch.randn(8, 4)).sum().backward()
    old.step()
    Schedule(sched_cfg(name="warmup_linear", warmup_steps=10), 100, 10).apply(old, 3)  # lr mid-warmup
    saved = old.state_dict()

    new_cfg = opt_cfg(name="adamw", lr=0.01, weight_decay=0.05, betas=[0.9, 0.999])
    new = build_optimizer(model, new_cfg, 64)
    new.load_state_dict(saved)
    # load_state_dict brings back the old hyperparameters ...
    assert new.param_groups[0]["lr"] == pytest.approx(0.1 * 0.3)
    apply_hparams(new, new_cfg, 64)
    # ... and apply_hparams puts the config's back, keeping the per-group decay rule
    for g in new.param_groups:
        assert g["lr"] == pytest.approx(0.01) and g["base_lr"] == pytest.approx(0.01)
        assert tuple(g["betas"]) == (0.9, 0.999)
        assert g["weight_decay"] == (0.05 if g["decay"] else 0.0)
    # the optimizer state (moments) survived
    assert all("exp_avg" in new.state[p] for p in model.parameters())


@pytest.mark.parametrize("old_wd,new_wd", [(0.0, 0.1), (0.1, 0.0)])
def test_resume_with_changed_weight_decay(old_wd, new_wd):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    old = build_optimizer(model, opt_cfg(name="adamw", lr=0.1, weight_decay=old_wd), 64)
    model(torch.randn(8, 4)).sum().backward()
    old.step()
    new_cfg = opt_cfg(name="adamw", lr=0.1, weight_decay=new_wd)
    new = build_optimizer(model, new_cfg, 64)
    new.load_state_dict(old.state_dict())
    apply_hparams(new, new_cfg, 64)
    no_decay = {id(p) for p in (model[0].bias, model[1].weight, model[1].bias, model[2].bias)}
    for g in new.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if id(p) in no_decay else new_wd)


def test_adamw_one_step_matches_decoupled_formula():
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.999, 1e-8
    theta0, g = 2.0, 0.3
    p = nn.Parameter(torch.tensor([theta0], dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()

    m = (1 - b1) * g
    v = (1 - b2) * g * g
    m_hat = m / (1 - b1 ** 1)  # bias-correction divisor 0.1 at t=1
    v_hat = v / (1 - b2 ** 1)
    expected = theta0 * (1 - lr * wd) - lr * m_hat / (math.sqrt(v_hat) + eps)
    assert p.item() == pytest.approx(expected, rel=1e-12)
    # at t=1 the bias-corrected step is ~lr * sign(g): theta ~ 2*(1-0.05) - 0.1 = 1.8
    assert p.item() == pytest.approx(1.8, abs=1e-6)
    # coupled (L2) decay would differ: Adam folds wd*theta into the gradient, then normalises it away
    assert abs(p.item() - (theta0 - lr * 1.0)) > 0.05
    assert 1 - b1 ** 10 == pytest.approx(0.6513, abs=1e-4)


def test_adamw_step_from_build_optimizer_matches_formula():
    """Through trainrun's factory: the configured lr/wd/betas/eps are the ones AdamW uses."""
    lr, wd, b1, b2, eps = 0.05, 0.2, 0.8, 0.99, 1e-6
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.5)
    opt = build_optimizer(lin, opt_cfg(name="adamw", lr=lr, weight_decay=wd, betas=[b1, b2], eps=eps), 64)
    gs = [0.4, -0.2, 0.7]
    theta, m, v = 1.5, 0.0, 0.0
    for t, g in enumerate(gs, start=1):
        lin.weight.grad = torch.tensor([[g]], dtype=torch.float64)
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta * (1 - lr * wd) - lr * m_hat / (math.sqrt(v_hat) + eps)
        assert lin.weight.item() == pytest.approx(theta, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def init_cfg(**kw):
    cfg = OmegaConf.structured(InitConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("scheme,fan_in,fan_out,expected", [
    ("xavier_normal", 1000, 1000, math.sqrt(2 / 2000)),
    ("xavier_normal", 500, 1500, math.sqrt(2 / 2000)),
    ("xavier_uniform", 1000, 1000, math.sqrt(2 / 2000)),
    ("kaiming_normal", 1000, 1000, math.sqrt(2 / 1000)),
    ("kaiming_normal", 400, 1200, math.sqrt(2 / 400)),
    ("kaiming_uniform", 1000, 1000, math.sqrt(2 / 1000)),
])
def test_init_std(scheme, fan_in, fan_out, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(fan_in, fan_out))
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    apply_init(model, init_cfg(name=scheme), "relu")
    w = model[0].weight
    # 1e6 samples: the std estimate is within ~0.1%; 2% tolerance still separates xavier from kaiming
    assert w.std().item() == pytest.approx(expected, rel=0.02)
    assert w.mean().item() == pytest.approx(0.0, abs=expected * 0.01)
    assert torch.all(model[0].bias == 0)
    if scheme == "xavier_uniform":
        assert w.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-7


def test_default_init_keeps_torch_init():
    torch.manual_seed(0)
    lin = nn.Linear(100, 50)
    before = lin.weight.detach().clone(), lin.bias.detach().clone()
    apply_init(lin, init_cfg(name="default"))
    assert torch.equal(lin.weight, before[0]) and torch.equal(lin.bias, before[1])


def test_trunc_normal_init():
    torch.manual_seed(0)
    lin = nn.Linear(1000, 1000)
    apply_init(lin, init_cfg(name="trunc_normal", std=0.02))
    assert lin.weight.abs().max().item() <= 0.04 + 1e-7
    # truncated at 2 sigma: std = 0.02 * 0.8796
    assert lin.weight.std().item() == pytest.approx(0.02 * 0.8796, rel=0.02)


@pytest.mark.parametrize("arch,block_attr", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_on_torchvision_resnets(arch, block_attr):
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    model = getattr(torchvision.models, arch)(num_classes=10)
    kind = BasicBlock if arch == "resnet18" else Bottleneck
    blocks = [m for m in model.modules() if isinstance(m, kind)]
    assert all(getattr(b, block_attr).weight.abs().sum() > 0 for b in blocks)
    apply_init(model, init_cfg(name="kaiming_normal", zero_init_residual=True))
    for b in blocks:
        assert torch.all(getattr(b, block_attr).weight == 0)
        assert torch.all(b.bn1.weight == 1)  # only the last norm of the branch
    assert zero_init_residual(model) == (8 if arch == "resnet18" else 16)
    # the stem norm is untouched
    assert torch.all(model.bn1.weight == 1)


def test_zero_init_residual_block_is_identity():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    apply_init(model, init_cfg(zero_init_residual=True))
    block = model.layer1[0]
    block.eval()
    x = torch.relu(torch.randn(2, 64, 8, 8))
    assert torch.allclose(block(x), x)  # relu(0 + x) = x for x >= 0


def test_zero_init_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    apply_init(model, init_cfg(name="kaiming_normal", zero_init_head=True))
    assert torch.all(model[3].weight == 0) and torch.all(model[3].bias == 0)
    assert model[1].weight.abs().sum() > 0
    assert torch.all(model(torch.randn(4, 16)) == 0)


def test_zero_init_residual_on_mlp_raises():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="zero_init_residual"):
        apply_init(model, init_cfg(zero_init_residual=True))


# ---------------------------------------------------------------------------------------------
# Label smoothing
# ---------------------------------------------------------------------------------------------

def test_label_smoothing_target_vector():
    reg = OmegaConf.structured(RegularizationConfig)
    reg.label_smoothing = 0.1
    loss_fn = build_loss(reg)
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    K, eps = 4, 0.1
    target = torch.full((5, K), eps / K, dtype=torch.float64)
    target[torch.arange(5), y] = 1 - eps + eps / K
    assert target[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    got = loss_fn(logits, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    # and it is not the plain cross entropy
    assert abs(got.item() - nn.functional.cross_entropy(logits, y).item()) > 1e-3

    reg.label_smoothing = 0.0
    assert build_loss(reg)(logits, y).item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())


# ---------------------------------------------------------------------------------------------
# Gradient clipping and the fp16 GradScaler order (PrecisionPolicy.step)
# ---------------------------------------------------------------------------------------------

def policy(name="fp32", **kw):
    cfg = OmegaConf.structured(PrecisionConfig)
    cfg.name = name
    for k, v in kw.items():
        cfg[k] = v
    return PrecisionPolicy(cfg, torch.device("cpu"))


def _param_with_grad():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.tensor([100.0, 1.0], dtype=torch.float64)
    return p


class _RecordingSGD(torch.optim.SGD):
    """SGD with lr 0 that records the gradients it was stepped with."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def test_clip_grad_value():
    p = _param_with_grad()
    opt = _RecordingSGD([p])
    norm = policy().step(opt, [p], clip_norm=None, clip_value=10.0, want_norm=False)
    assert p.grad.tolist() == [10.0, 1.0]
    assert opt.seen[0][0].tolist() == [10.0, 1.0]  # clipped before the optimizer step
    assert norm.item() == pytest.approx(math.sqrt(100 ** 2 + 1), rel=1e-9)  # pre-clip norm


def test_clip_grad_norm():
    p = _param_with_grad()
    opt = _RecordingSGD([p])
    norm = policy().step(opt, [p], clip_norm=10.0, clip_value=None, want_norm=False)
    assert p.grad[0].item() == pytest.approx(9.9995, abs=1e-4)
    assert p.grad[1].item() == pytest.approx(0.099995, abs=1e-6)
    assert p.grad.norm().item() == pytest.approx(10.0, rel=1e-5)
    assert opt.seen[0][0].tolist() == pytest.approx(p.grad.tolist())
    assert norm.item() == pytest.approx(100.005, abs=1e-3)


def test_no_clip_when_under_threshold_and_norm_reported():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    opt = _RecordingSGD([p])
    norm = policy().step(opt, [p], clip_norm=10.0, clip_value=None, want_norm=False)
    assert p.grad.tolist() == [3.0, 4.0]
    assert norm.item() == pytest.approx(5.0)
    assert policy().step(opt, [p], clip_norm=None, clip_value=None, want_norm=False) is None
    assert policy().step(opt, [p], clip_norm=None, clip_value=None, want_norm=True).item() == pytest.approx(5.0)


def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, x, y


def test_fp16_scaler_skips_step_on_inf_and_halves_scale():
    model, opt, x, y = _tiny()
    pol = policy("fp16", init_scale=1024.0)
    assert pol.scaler.is_enabled()
    before = [p.detach().clone() for p in model.parameters()]
    with pol.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    pol.backward(loss)
    model.weight.grad[0, 0] = float("inf")
    pol.step(opt, model.parameters(), clip_norm=None, clip_value=None, want_norm=False)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
    assert pol.scaler.get_scale() == 512.0


def test_fp16_scaler_skips_step_on_nan_with_clipping():
    model, opt, x, y = _tiny()
    pol = policy("fp16", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    pol.backward(nn.functional.cross_entropy(model(x), y))
    model.bias.grad[1] = float("nan")
    norm = pol.step(opt, model.parameters(), clip_norm=1.0, clip_value=None, want_norm=True)
    assert not math.isfinite(norm.item())
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
    assert pol.scaler.get_scale() == 512.0


def test_fp16_finite_grads_step_and_unscale_before_clip():
    model, opt, x, y = _tiny()
    # reference gradient in plain fp32
    ref_model = nn.Linear(4, 2)
    ref_model.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref_norm = torch.cat([p.grad.flatten() for p in ref_model.parameters()]).norm().item()

    pol = policy("fp16", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    pol.backward(nn.functional.cross_entropy(model(x), y))
    # the gradient is scaled after backward ...
    assert model.weight.grad.norm().item() > 100 * ref_norm * 0.5
    norm = pol.step(opt, model.parameters(), clip_norm=None, clip_value=None, want_norm=True)
    # ... and unscaled before the norm/clip and the step
    assert norm.item() == pytest.approx(ref_norm, rel=1e-4)
    for b, p, rp in zip(before, model.parameters(), ref_model.parameters()):
        assert not torch.equal(b, p.detach())
        assert torch.allclose(p.detach(), b - 0.1 * rp.grad, atol=1e-6)
    assert pol.scaler.get_scale() == 1024.0  # growth only after growth_interval clean steps


def test_fp16_scale_grows_after_growth_interval():
    model, opt, x, y = _tiny()
    pol = policy("fp16", init_scale=1024.0, growth_interval=3)
    for _ in range(3):
        opt.zero_grad()
        pol.backward(nn.functional.cross_entropy(model(x), y))
        pol.step(opt, model.parameters(), clip_norm=None, clip_value=None, want_norm=False)
    assert pol.scaler.get_scale() == 2048.0


def test_fp32_and_bf16_have_no_scaler():
    assert not policy("fp32").scaler.is_enabled()
    assert not policy("bf16").scaler.is_enabled()
    assert policy("bf16").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# RNG state capture / restore
# ---------------------------------------------------------------------------------------------

def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), float(np.random.standard_normal()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def _prime_rngs():
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    np.random.standard_normal()  # and a cached gaussian in numpy's


def test_rng_round_trip():
    _prime_rngs()
    state = capture_rng_state()
    first = _draw()
    _ = _draw()  # move every generator on
    restore_rng_state(state)
    assert _draw() == first


def test_rng_round_trip_through_weights_only_torch_load(tmp_path):
    _prime_rngs()
    state = capture_rng_state()
    first = _draw()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert _draw() != first
    restore_rng_state(loaded)
    assert _draw() == first
    # also via a file on disk
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == first


# ---------------------------------------------------------------------------------------------
# config.validate
# ---------------------------------------------------------------------------------------------

def full_cfg():
    return OmegaConf.structured(TrainrunConfig)


def test_default_config_is_valid():
    validate(full_cfg())


def _set(cfg, dotted, value):
    OmegaConf.update(cfg, dotted, value, merge=False)


@pytest.mark.parametrize("changes,key", [
    ({"optimizer.lr": -0.1}, "optimizer.lr"),
    ({"optimizer.lr": 0.0}, "optimizer.lr"),
    ({"optimizer.lr": float("nan")}, "optimizer.lr"),
    ({"regularization.label_smoothing": 1.0}, "regularization.label_smoothing"),
    ({"regularization.label_smoothing": -0.1}, "regularization.label_smoothing"),
    ({"optimizer.betas": [0.9, 0.99, 0.999]}, "optimizer.betas"),
    ({"optimizer.betas": [0.9, 1.0]}, "optimizer.betas"),
    ({"regularization.clip_grad_norm": 1.0, "regularization.clip_grad_value": 1.0}, "clip_grad"),
    ({"regularization.clip_grad_norm": -1.0}, "regularization.clip_grad_norm"),
    ({"model.name": "transformer9000"}, "model.name"),
    ({"schedule.warmup_steps": 10, "schedule.warmup_fraction": 0.1}, "schedule.warmup_"),
    ({"schedule.warmup_fraction": 0.05, "schedule.warmup_epochs": 1.0}, "schedule.warmup_"),
    ({"schedule.name": "multistep", "schedule.milestones": [0.6, 0.3]}, "schedule.milestones"),
    ({"schedule.name": "multistep", "schedule.milestones": []}, "schedule.milestones"),
    ({"schedule.name": "multistep", "schedule.milestones": [0.5, 1.5]}, "schedule.milestones"),
    ({"schedule.name": "step", "schedule.step_size": 0}, "schedule.step_size"),
    ({"schedule.name": "cosine"}, "schedule.name"),
    ({"schedule.min_lr_ratio": 1.5}, "schedule.min_lr_ratio"),
    ({"optimizer.name": "lion"}, "optimizer.name"),
    ({"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.nesterov": True}, "optimizer.nesterov"),
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"data.val_fraction": 1.0}, "data.val_fraction"),
    ({"trainer.accumulation_steps": 0}, "trainer.accumulation_steps"),
    ({"trainer.device": "tpu"}, "trainer.device"),
    ({"precision.name": "fp8"}, "precision.name"),
    ({"data.input_shape": [8, 8]}, "data.input_shape"),
])
def test_validate_rejects_bad_values(changes, key):
    cfg = full_cfg()
    for k, v in changes.items():
        _set(cfg, k, v)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_validate_accepts_good_variants():
    cfg = full_cfg()
    for k, v in {"schedule.name": "multistep", "schedule.milestones": [0.3, 0.6, 0.9],
                 "regularization.clip_grad_norm": 1.0, "regularization.label_smoothing": 0.1,
                 "schedule.warmup_fraction": 0.05, "optimizer.name": "sgd", "optimizer.nesterov": True,
                 "model.name": "resnet18", "trainer.device": "cuda:1"}.items():
        _set(cfg, k, v)
    validate(cfg)


def test_validate_rejects_unknown_added_key():
    cfg = OmegaConf.create(OmegaConf.to_container(full_cfg()))  # untyped, as `+key=value` can produce
    validate(cfg)
    cfg.optimizer.lrr = 0.1
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        validate(cfg)
