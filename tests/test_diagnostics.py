"""The LR range test (mode=lr_find)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import FAST, read_jsonl, run_cli
from trainrun.config import PrecisionConfig
from trainrun.diagnostics import lr_find, memory_plan, optimizer_state_bytes
from trainrun.precision import PrecisionPolicy


def _stream(x, y, bs=32):
    while True:
        for i in range(0, len(y) - bs + 1, bs):
            yield x[i:i + bs], y[i:i + bs]


def test_lr_find_sweeps_exponentially_stops_on_divergence_and_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = json.dumps(opt.state_dict()["param_groups"], default=str)
    prec = PrecisionPolicy(OmegaConf.structured(PrecisionConfig), torch.device("cpu"))
    r = lr_find(model, opt, _stream(x, y), nn.CrossEntropyLoss(), prec, torch.device("cpu"), 1e-6, 100.0, 60)
    ratios = [b / a for a, b in zip(r["lrs"], r["lrs"][1:])]
    assert all(math.isclose(q, (1e8) ** (1 / 59), rel_tol=1e-9) for q in ratios)
    assert len(r["lrs"]) < 60  # lr 100 with momentum diverges before the end
    assert r["losses"][-1] > 4 * min(r["losses"]) or not math.isfinite(r["losses"][-1])
    assert 1e-6 < r["suggested_lr"] < r["min_loss_lr"] <= 100
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.dumps(opt.state_dict()["param_groups"], default=str) == opt_before and not opt.state


def test_lr_find_through_the_cli_on_digits(tmp_path):
    p = run_cli(tmp_path, "mode=lr_find", "run_name=lr", *FAST)
    out = json.loads((tmp_path / "runs/lr/lr_find.json").read_text())
    assert 1e-4 < out["suggested_lr"] < 1.0  # a sane range for AdamW on the digits CNN
    assert (tmp_path / "runs/lr/lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested optimizer.lr=" in p.stdout
    assert not (tmp_path / "runs/lr/checkpoints").exists()


@pytest.mark.parametrize("name, momentum, per_param", [
    ("adamw", 0.9, 16), ("adam", 0.9, 16), ("sgd", 0.9, 12), ("sgd", 0.0, 8), ("rmsprop", 0.0, 12),
    ("adagrad", 0.0, 12),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_plan_bytes_per_param(name, momentum, per_param, precision):
    model = nn.Linear(1000, 1000, bias=False)
    plan = memory_plan(model, name, momentum, precision)
    assert plan["params"] == 1_000_000 and plan["bytes_per_param"] == per_param  # Adam: 16 B in fp32 and bf16


@pytest.mark.parametrize("name, kwargs", [("adamw", {}), ("sgd", {"momentum": 0.9}), ("rmsprop", {"momentum": 0.9}),
                                          ("adagrad", {}), ("adafactor", {})])
def test_optimizer_state_bytes_match_what_torch_allocates(name, kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop,
           "adagrad": torch.optim.Adagrad, "adafactor": torch.optim.Adafactor}[name]
    opt = cls(model.parameters(), lr=0.01, **kwargs)
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    real = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
               if torch.is_tensor(t) and k != "step")
    assert optimizer_state_bytes(name, list(model.parameters()), kwargs.get("momentum", 0.0)) == real


def test_run_prints_the_memory_plan_and_logs_the_measured_peak(tmp_path):
    p = run_cli(tmp_path, "run_name=m", "trainer.max_steps=5", "optimizer=adamw", "precision=bf16", *FAST)
    assert "memory plan:" in p.stdout and "16.0 B/param" in p.stdout
    rows = [r for r in read_jsonl(tmp_path / "runs/m/metrics.jsonl") if "peak_mem_mb" in r]
    assert rows and rows[0]["peak_mem_mb"] > 0
