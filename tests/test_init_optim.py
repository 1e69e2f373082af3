"""The optimizer catalogue, per-group LR multipliers, the init catalogue (LSUV, GPT-2) and the init report:
checked against torch's own optimizers, hand formulas and the SEED_NOTES test vectors, plus end-to-end CLI runs."""
import os

os.environ["WANDB_MODE"] = "disabled"

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402

from trainrun.config import InitConfig, ModelConfig, OptimizerConfig, ScheduleConfig  # noqa: E402
from trainrun.diagnostics import activation_report, render_activation_report  # noqa: E402
from trainrun.errors import ConfigError  # noqa: E402
from trainrun.init import apply_init  # noqa: E402
from trainrun.models import build_model  # noqa: E402
from trainrun.optim import apply_hparams, build_optimizer  # noqa: E402
from trainrun.schedule import Schedule  # noqa: E402
from conftest import trainrun_process  # noqa: E402


def opt_cfg(**kw):
    cfg = OmegaConf.structured(OptimizerConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def init_cfg(**kw):
    cfg = OmegaConf.structured(InitConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def model_cfg(**kw):
    cfg = OmegaConf.structured(ModelConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ---------------------------------------------------------------------------------------------
# Optimizers: every option through build_optimizer == the torch optimizer built by hand
# ---------------------------------------------------------------------------------------------

WD = 0.1
# name, config overrides (non-default values, so a dropped hyperparameter shows), torch class, torch kwargs,
# the group keys that must carry the config's values
CASES = [
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True), torch.optim.SGD,
     dict(lr=0.05, momentum=0.8, nesterov=True), ("momentum", "nesterov")),
    ("adam", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6), torch.optim.Adam,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6), ("betas", "eps")),
    ("adamw", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6), torch.optim.AdamW,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6), ("betas", "eps")),
    ("rmsprop", dict(lr=0.01, alpha=0.8, momentum=0.5, eps=1e-6), torch.optim.RMSprop,
     dict(lr=0.01, alpha=0.8, momentum=0.5, eps=1e-6), ("alpha", "momentum", "eps")),
    ("adagrad", dict(lr=0.05, eps=1e-6), torch.optim.Adagrad, dict(lr=0.05, eps=1e-6), ("eps",)),
    ("nadam", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6, decoupled_weight_decay=True), torch.optim.NAdam,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, decoupled_weight_decay=True),
     ("betas", "eps", "decoupled_weight_decay")),
    ("nadam", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6, decoupled_weight_decay=False), torch.optim.NAdam,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, decoupled_weight_decay=False),
     ("betas", "eps", "decoupled_weight_decay")),
    ("radam", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6, decoupled_weight_decay=True), torch.optim.RAdam,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, decoupled_weight_decay=True),
     ("betas", "eps", "decoupled_weight_decay")),
    ("radam", dict(lr=0.01, betas=[0.8, 0.95], eps=1e-6, decoupled_weight_decay=False), torch.optim.RAdam,
     dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, decoupled_weight_decay=False),
     ("betas", "eps", "decoupled_weight_decay")),
    ("adafactor", dict(lr=0.02), torch.optim.Adafactor, dict(lr=0.02), ()),
]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("name,kw,cls,torch_kw,keys", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_optimizer_matches_torch_reference(name, kw, cls, torch_kw, keys):
    model = _net()
    ref_model = copy.deepcopy(model)
    cfg = opt_cfg(name=name, weight_decay=WD, **kw)
    opt = build_optimizer(model, cfg, 64)
    assert type(opt) is cls
    # the config's hyperparameters are in every group; no decay on norm/bias
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(kw["lr"]) and g["base_lr"] == pytest.approx(kw["lr"])
        assert g["weight_decay"] == (WD if g["decay"] else 0.0)
        for k in keys:
            assert g[k] == torch_kw[k], k
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay"}

    # the same torch optimizer constructed directly, with the same decay split
    r = dict(ref_model.named_parameters())
    ref = cls([{"params": [r["0.weight"], r["3.weight"]], "weight_decay": WD},
               {"params": [r["0.bias"], r["1.weight"], r["1.bias"], r["3.bias"]], "weight_decay": 0.0}], **torch_kw)
    for step in range(3):
        _grads(model, step)
        _grads(ref_model, step)
        opt.step()
        ref.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=f"{name}: {n} differs from torch's {cls.__name__}")
    assert not torch.equal(model[0].weight, _net()[0].weight)  # it moved


def test_adafactor_keeps_torch_defaults():
    opt = build_optimizer(_net(), opt_cfg(name="adafactor", lr=0.01, weight_decay=0.05), 64)
    ref = torch.optim.Adafactor([nn.Parameter(torch.zeros(2))])
    for g in opt.param_groups:
        assert g["beta2_decay"] == ref.defaults["beta2_decay"] and tuple(g["eps"]) == tuple(ref.defaults["eps"])
        assert g["d"] == ref.defaults["d"]
        assert g["weight_decay"] == (0.05 if g["decay"] else 0.0)


def test_rmsprop_step_matches_hand_formula():
    lr, alpha, eps = 0.01, 0.9, 1e-8
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.5)
    opt = build_optimizer(lin, opt_cfg(name="rmsprop", lr=lr, alpha=alpha, eps=eps, momentum=0.0), 64)
    theta, v = 1.5, 0.0
    for g in (0.4, -0.2, 0.7):
        lin.weight.grad = torch.tensor([[g]], dtype=torch.float64)
        opt.step()
        v = alpha * v + (1 - alpha) * g * g
        theta -= lr * g / (math.sqrt(v) + eps)
        assert lin.weight.item() == pytest.approx(theta, rel=1e-12)


@pytest.mark.parametrize("name", ["rmsprop", "adagrad", "nadam", "radam", "adafactor"])
def test_new_optimizer_configs_compose(name):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup
    from trainrun.config import validate

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="t"):
        cfg = compose("config", overrides=[f"optimizer={name}", "model=mlp"])
    validate(cfg)
    assert cfg.optimizer.name == name
    expected_lr = {"rmsprop": 1e-3, "adagrad": 1e-2, "adafactor": 1e-2}
    if name in expected_lr:
        assert cfg.optimizer.lr == pytest.approx(expected_lr[name])
    if name == "rmsprop":
        assert cfg.optimizer.alpha == pytest.approx(0.9) and cfg.optimizer.momentum == 0.0
    opt = build_optimizer(build_model(cfg.model, (1, 8, 8), 10, 0.0), cfg.optimizer, 64)
    assert type(opt).__name__.lower() == name


# ---------------------------------------------------------------------------------------------
# Per-group LR multipliers
# ---------------------------------------------------------------------------------------------

def _bn_net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_lr_multipliers_split_groups_and_scale_base_lr():
    model = _bn_net()
    cfg = opt_cfg(name="sgd", lr=0.01, weight_decay=1e-4, lr_multipliers={"2.*": 10.0, "0.*": 0.1})
    opt = build_optimizer(model, cfg, 64)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert set(groups) == {"decay[0.*]", "decay[2.*]", "no_decay[0.*]", "no_decay[2.*]", "no_decay"}
    assert ids(groups["decay[2.*]"]) == {id(model[2].weight)}
    assert ids(groups["no_decay[2.*]"]) == {id(model[2].bias)}
    assert ids(groups["decay[0.*]"]) == {id(model[0].weight)}
    assert ids(groups["no_decay"]) == {id(model[1].weight), id(model[1].bias)}
    expect = {"decay[0.*]": 0.1, "no_decay[0.*]": 0.1, "decay[2.*]": 10.0, "no_decay[2.*]": 10.0, "no_decay": 1.0}
    for name, mult in expect.items():
        g = groups[name]
        assert g["lr_mult"] == mult
        assert g["base_lr"] == pytest.approx(0.01 * mult) and g["lr"] == pytest.approx(0.01 * mult)
        assert g["weight_decay"] == (1e-4 if g["decay"] else 0.0)
    assert opt.param_groups[0]["lr_mult"] == 1.0  # the unscaled group leads (the logged/printed LR is the config's)
    # every parameter exactly once
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    # the schedule multiplies base_lr, so the factors survive warmup/decay
    sched = OmegaConf.structured(ScheduleConfig)
    sched.name, sched.warmup_steps = "warmup_linear", 10
    Schedule(sched, 100, 10).apply(opt, 5)
    for name, mult in expect.items():
        assert groups[name]["lr"] == pytest.approx(0.01 * mult * 0.5)


def test_lr_multipliers_first_match_wins_and_scaling_rule():
    model = _bn_net()
    cfg = opt_cfg(lr=0.1, lr_multipliers={"2.weight": 3.0, "2.*": 10.0}, scale_lr_with_batch=True,
                  reference_batch_size=256)
    opt = build_optimizer(model, cfg, 512)  # linear scaling: effective lr 0.2
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model[2].weight)]["base_lr"] == pytest.approx(0.2 * 3.0)
    assert by_param[id(model[2].bias)]["base_lr"] == pytest.approx(0.2 * 10.0)
    assert by_param[id(model[0].weight)]["base_lr"] == pytest.approx(0.2)


def test_lr_multipliers_unmatched_pattern_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        build_optimizer(_bn_net(), opt_cfg(lr_multipliers={"fc.*": 10.0}), 64)
    msg = str(e.value)
    assert "\n" not in msg
    assert "optimizer.lr_multipliers" in msg and "fc.*" in msg and "0.weight" in msg
    with pytest.raises(ConfigError, match="optimizer.lr_multipliers"):
        build_optimizer(_bn_net(), opt_cfg(lr_multipliers={"0.*": -1.0}), 64)


def test_lr_multipliers_group_structure_survives_a_resume_with_new_values():
    model = _bn_net()
    old = build_optimizer(model, opt_cfg(name="adamw", lr=0.01, weight_decay=0.0, lr_multipliers={"2.*": 10.0}), 64)
    model(torch.randn(8, 4)).sum().backward()
    old.step()
    new_cfg = opt_cfg(name="adamw", lr=0.02, weight_decay=0.1, lr_multipliers={"2.*": 5.0})
    new = build_optimizer(model, new_cfg, 64)
    new.load_state_dict(old.state_dict())  # same structure although weight_decay and the factor changed
    apply_hparams(new, new_cfg, 64)
    for g in new.param_groups:
        mult = 5.0 if g["lr_pattern"] == "2.*" else 1.0
        assert g["lr_mult"] == mult and g["base_lr"] == pytest.approx(0.02 * mult)
        assert g["weight_decay"] == (0.1 if g["decay"] else 0.0)
    assert all("exp_avg" in new.state[p] for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Init: LSUV, GPT-2, refusals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_lsuv_gives_unit_output_variance_per_layer(arch):
    torch.manual_seed(0)
    model = build_model(model_cfg(name=arch, hidden_sizes=[128, 64], channels=[8, 16]), (1, 8, 8), 10, 0.0)
    model.train()
    x = torch.randn(128, 1, 8, 8) * 3 + 1  # not already unit-variance inputs
    cfg = init_cfg(name="lsuv", lsuv_tol=0.01)
    apply_init(model, cfg, "relu", batch=x)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0) for bn in bns)  # untouched
    rows = [r for r in activation_report(model, x) if r["type"] in ("Linear", "Conv2d")]
    assert len(rows) == (3 if arch == "mlp" else 5)
    for r in rows:
        assert abs(r["var"] - 1.0) < cfg.lsuv_tol, r
    if arch == "mlp":  # orthogonal directions, rescaled: W^T W is a multiple of I for the 128x64 layer
        w = model[1].weight.detach().double()
        wtw = w.T @ w
        torch.testing.assert_close(wtw / wtw.diagonal().mean(), torch.eye(64, dtype=torch.float64), atol=1e-5,
                                   rtol=0)


def test_lsuv_eval_mode_kept_and_target_variance():
    torch.manual_seed(0)
    model = build_model(model_cfg(name="mlp", hidden_sizes=[64]), (1, 8, 8), 10, 0.0).eval()
    x = torch.randn(64, 1, 8, 8)
    apply_init(model, init_cfg(name="lsuv", lsuv_target_var=2.0, lsuv_tol=0.05), batch=x)
    assert not model.training
    for r in activation_report(model, x):
        if r["type"] == "Linear":
            assert abs(r["var"] - 2.0) < 0.05


def test_lsuv_needs_a_batch():
    with pytest.raises(ConfigError, match="in-memory dataset batch"):
        apply_init(nn.Linear(3, 3), init_cfg(name="lsuv"), batch=None)


@pytest.mark.parametrize("name", ["constant", "zeros"])
def test_constant_init_refused_with_symmetry(name):
    with pytest.raises(ConfigError, match="symmetry"):
        apply_init(nn.Linear(3, 3), init_cfg(name=name, value=0.5))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.attn_proj._residual_projection = True
        self.fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        self.mlp_proj._residual_projection = True

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.attn_proj(att @ v)
        return x + self.mlp_proj(torch.relu(self.fc(self.ln2(x))))


class _TinyGPT(nn.Module):
    def __init__(self, vocab=512, d=128, n_layers=2, declare_layers=True):
        super().__init__()
        if declare_layers:
            self.num_layers = n_layers
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("declare_layers", [True, False])
def test_gpt2_init_stds(declare_layers):
    torch.manual_seed(0)
    model = _TinyGPT(declare_layers=declare_layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.Linear)) and getattr(m, "bias", None) is not None:
                m.bias.fill_(0.3)
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(0.5)
    apply_init(model, init_cfg(name="gpt2", std=0.02))
    n = 2 if declare_layers else 4  # num_layers, else the number of marked projections
    scaled = 0.02 / math.sqrt(2 * n)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            want = scaled if getattr(m, "_residual_projection", False) else 0.02
            assert m.weight.std().item() == pytest.approx(want, rel=0.05), name
            assert abs(m.weight.mean().item()) < want * 0.05, name
            if getattr(m, "bias", None) is not None:
                assert torch.all(m.bias == 0), name
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert model(torch.randint(0, 512, (2, 16))).shape == (2, 16, 512)


# ---------------------------------------------------------------------------------------------
# Activation report: the SEED_NOTES deep-ReLU test vector
# ---------------------------------------------------------------------------------------------

def _deep_mlp_linear_vars(scheme):
    torch.manual_seed(0)
    model = build_model(model_cfg(name="mlp", depth=50, hidden_sizes=[256]), (1, 16, 16), 10, 0.0)
    apply_init(model, init_cfg(name=scheme), "relu")
    rows = activation_report(model, torch.randn(256, 1, 16, 16))
    assert len(rows) == 1 + 2 * 50 + 1  # flatten, 50 x (Linear, ReLU), head
    assert [r["type"] for r in rows[1:5]] == ["Linear", "ReLU", "Linear", "ReLU"]
    relu = [r for r in rows if r["type"] == "ReLU"]
    assert all(0.4 < r["dead_frac"] < 0.6 for r in relu)  # half the ReLU outputs are exactly zero
    return [r["var"] for r in rows if r["type"] == "Linear"][:-1]  # the 50 hidden layers, head excluded


def test_deep_relu_mlp_xavier_vanishes_kaiming_keeps_variance():
    xav = _deep_mlp_linear_vars("xavier_normal")
    assert len(xav) == 50
    assert xav[-1] / xav[0] < 1e-10
    per_layer = (xav[-1] / xav[0]) ** (1 / 49)
    assert per_layer == pytest.approx(0.5, abs=0.05)  # ~0.5 per layer (0.5^49 ~ 1.8e-15)
    kai = _deep_mlp_linear_vars("kaiming_normal")
    assert 1 / 3 < kai[-1] / kai[0] < 3


def test_activation_report_restores_mode_removes_hooks_and_renders_every_row():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[3].eval()  # a mixed-mode model comes back exactly as it was
    rows = activation_report(model, torch.randn(32, 4))
    assert [r["layer"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["type"] for r in rows] == ["Linear", "Dropout", "ReLU", "BatchNorm1d", "Linear"]
    assert rows[1]["var"] == rows[0]["var"]  # dropout is off (eval mode)
    assert model.training and model[0].training and not model[3].training
    assert all(not m._forward_hooks for m in model.modules())
    out = torch.relu(model[0](torch.randn(3, 4)))  # the report does not change the model's behaviour
    assert out.shape == (3, 4)
    x = torch.randn(1000, 4)
    with torch.no_grad():
        y = torch.relu(model[0](x))
    r = next(r for r in activation_report(model, x) if r["layer"] == "2")
    assert r["mean"] == pytest.approx(y.double().mean().item(), rel=1e-9)
    assert r["var"] == pytest.approx(y.double().var(unbiased=False).item(), rel=1e-9)
    assert r["dead_frac"] == pytest.approx((y == 0).double().mean().item())

    console = Console(record=True, width=120)
    deep = build_model(model_cfg(name="mlp", depth=50, hidden_sizes=[16]), (1, 4, 4), 10, 0.0)
    deep_rows = activation_report(deep, torch.randn(8, 1, 4, 4))
    render_activation_report(deep_rows, console, title="activations at init")
    text = console.export_text()
    assert "activations at init" in text and "dead %" in text
    assert "101" in text and "…" not in text  # every row is printed, the last one too


# ---------------------------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------------------------

def _cli(cwd, *args):
    return trainrun_process(args, cwd, {**os.environ, "WANDB_MODE": "disabled"})


def _ok(p):
    assert p.returncode == 0, f"{p.args}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def test_cli_init_report_xavier_vanishes_kaiming_does_not(tmp_path):
    base = ["mode=init_report", "model=mlp", "model.depth=50", "model.hidden_sizes=[256]", "logger.progress=off"]
    schemes = ("xavier_normal", "kaiming_normal")
    for s in schemes:
        (tmp_path / s).mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = {s: pool.submit(_cli, tmp_path / s, *base, f"init={s}") for s in schemes}
        procs = {s: _ok(f.result()) for s, f in runs.items()}
    for scheme, p in procs.items():
        assert f"activations at init: model=mlp init={scheme}" in p.stdout
        assert "dead %" in p.stdout
        reports = list((tmp_path / scheme / "runs").glob("*/init_report.json"))
        assert len(reports) == 1
        rows = json.loads(reports[0].read_text())
        assert len(rows) == 102 and set(rows[0]) == {"layer", "type", "mean", "var", "dead_frac"}
        linear = [r for r in rows if r["type"] == "Linear"]
        assert len(linear) == 51
        last_hidden = linear[-2]["var"]
        if scheme == "xavier_normal":
            assert last_hidden < 1e-10
        else:
            assert 0.1 < last_hidden < 10


def test_cli_new_optimizers_lsuv_and_zeros(tmp_path):
    names = ("rmsprop", "adagrad", "nadam", "radam", "adafactor")
    common = ["trainer.max_steps=3", "logger.progress=off"]
    jobs = {
        # one training run per new optimizer, as a Hydra sweep in one process (saves four interpreter starts)
        "optimizers": ["-m", f"optimizer={','.join(names)}", "model=mlp", *common],
        "lsuv": ["init=lsuv", *common],  # default model: the CNN with BatchNorm, on digits
        "zeros": ["init=zeros", *common],
    }
    for name in jobs:
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(_cli, tmp_path / name, *args) for name, args in jobs.items()}
        procs = {name: f.result() for name, f in futures.items()}
    sweep = _ok(procs["optimizers"]).stdout
    for name in names:
        at = sweep.find(f"optimizer: {name} ")
        assert at >= 0 and "trainrun: finished" in sweep[at:], f"optimizer={name} did not finish:\n{sweep[-3000:]}"
    assert len(list((tmp_path / "optimizers").rglob("metrics.jsonl"))) == len(names)
    assert "trainrun: finished" in _ok(procs["lsuv"]).stdout
    z = procs["zeros"]
    assert z.returncode == 2
    lines = z.stderr.strip().splitlines()
    assert len(lines) == 1 and "symmetry" in lines[0], z.stderr


def test_cli_lr_multipliers(tmp_path):
    ok = _cli(tmp_path, "model=mlp", "++optimizer.lr_multipliers={3.*:10.0}", "trainer.max_steps=3",
              "logger.progress=off")
    _ok(ok)
    bad = _cli(tmp_path, "model=mlp", "++optimizer.lr_multipliers={fc.*:10.0}", "trainer.max_steps=3",
               "logger.progress=off", "run_name=bad")
    assert bad.returncode == 2 and "matches no parameter" in bad.stderr
