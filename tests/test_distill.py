"""Knowledge distillation: the loss against hand-computed values, the T^2 property, teachers, and the CLI."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import structured, sha_of
from trainrun.config import DistillationConfig
from trainrun.distill import Distiller, kd_loss
from trainrun.errors import ConfigError

os.environ.setdefault("WANDB_MODE", "disabled")


def dcfg(**kw):
    return structured(DistillationConfig, **kw)


def test_kd_loss_matches_hand_computed_kl():
    zs = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    zt = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    T = 2.0
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        es = [pow(2.718281828459045, v / T) for v in s_row]
        et = [pow(2.718281828459045, v / T) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(p * (torch.tensor(p).log().item() - torch.tensor(q).log().item()) for p, q in zip(pt, ps))
    expected = T * T * total / 2  # batchmean
    assert kd_loss(zs, zt, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(zt, zt, T).item() == pytest.approx(0.0, abs=1e-7)


def test_t_squared_keeps_the_soft_gradient_scale_constant_in_t():
    torch.manual_seed(0)
    zt = torch.randn(32, 10) * 3
    zt = zt - zt.mean(1, keepdim=True)
    zs0 = torch.randn(32, 10)
    zs0 = zs0 - zs0.mean(1, keepdim=True)

    def grad_norm(T, scaled):
        zs = zs0.clone().requires_grad_(True)
        loss = kd_loss(zs, zt, T) if scaled else kd_loss(zs, zt, T) / (T * T)
        loss.backward()
        return zs.grad.norm().item()

    # Hinton 2015: for large T the gradient of the soft term is ~ (z_s - z_t) / (N K T^2); T^2 cancels it
    assert grad_norm(20, True) / grad_norm(10, True) == pytest.approx(1.0, abs=0.05)
    assert grad_norm(20, False) / grad_norm(10, False) == pytest.approx(0.25, abs=0.02)
    expected = ((zs0 - zt) / (32 * 10)).norm().item()
    assert grad_norm(50, True) == pytest.approx(expected, rel=0.05)


def test_distiller_response_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    d = Distiller(dcfg(name="response", alpha=0.7, temperature=3.0), student, teacher, x)
    zs = student(x)
    loss, parts = d.loss(x, zs, y, nn.CrossEntropyLoss(), _null)
    expected = 0.3 * F.cross_entropy(zs, y) + 0.7 * kd_loss(zs, teacher(x), 3.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert teacher.weight.grad is None and student.weight.grad is not None
    assert "teacher" not in "".join(d.state_dict())  # only projections are saved


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_feature_hints_project_and_fail_clearly():
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    d = Distiller(dcfg(name="feature", feature_pairs=["1:1", "3:3"], feature_weight=2.0), student, teacher, x)
    assert isinstance(d.proj[0], nn.Conv2d) and d.proj[0].in_channels == 4 and d.proj[0].out_channels == 8
    assert isinstance(d.proj[1], nn.Linear)
    zs = student(x)
    loss, parts = d.loss(x, zs, y, nn.CrossEntropyLoss(), _null)
    assert "loss_hint" in parts and loss.requires_grad
    loss.backward()
    assert d.proj[0].weight.grad is not None
    with pytest.raises(ConfigError, match="no layer named 'nope'"):
        Distiller(dcfg(name="feature", feature_pairs=["nope:1"]), student, teacher, x)
    with pytest.raises(ConfigError, match="cannot be projected"):
        Distiller(dcfg(name="feature", feature_pairs=["1:3"]), student, teacher, x)
    with pytest.raises(ConfigError, match="feature_pairs"):
        Distiller(dcfg(name="feature"), student, teacher, x)


def test_response_feature_and_self_distillation_through_the_cli(cli):
    cli("run_name=teacher", "trainer.max_steps=20", "trainer.eval_every=20")
    p = cli("run_name=student", "model=mlp", "model.hidden_sizes=[32]", "distillation=response",
            "distillation.teacher=runs/teacher", "trainer.max_steps=10", "trainer.eval_every=10")
    assert "trainrun: finished" in p.stdout
    meta = json.loads((cli.dir / "runs/student/checkpoints/step_000000010/meta.json").read_text())
    assert meta["teacher"]["sha256"] == sha_of(cli.dir / "runs/teacher", 20)
    assert meta["teacher"]["model"]["name"] == "cnn"
    # feature KD: projections are trained with the student and saved; the run resumes exactly
    common = ["model=mlp", "model.hidden_sizes=[32]", "distillation=feature", "distillation.teacher=runs/teacher",
              "distillation.feature_pairs=[2:14]", "trainer.max_steps=12", "trainer.ckpt_every=4"]
    cli("run_name=f1", *common)
    cli("run_name=f2", *common, "trainer.stop_at_step=6")
    cli("resume=runs/f2", *common)
    assert sha_of(cli.dir / "runs/f1", 12) == sha_of(cli.dir / "runs/f2", 12)
    st = torch.load(cli.dir / "runs/f1/checkpoints/step_000000012/state.pt", weights_only=True)
    assert st["distill"]["proj.0.weight"].shape == (64, 32)
    p = cli("distillation=self", "regularization.ema_decay=0.9", "trainer.max_steps=6", "trainer.eval_every=6")
    assert "trainrun: finished" in p.stdout
    p = cli("distillation=self", "trainer.max_steps=2", check=False)
    assert p.returncode == 2 and "ema_decay" in p.stderr


def test_tampered_teacher_is_refused(cli):
    cli("run_name=teacher", "trainer.max_steps=4", "trainer.ckpt_every=4")
    state = cli.dir / "runs/teacher/checkpoints/step_000000004/state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 1
    state.write_bytes(bytes(data))
    p = cli("distillation=response", "distillation.teacher=runs/teacher/checkpoints/step_000000004",
            "trainer.max_steps=2", check=False)
    assert p.returncode == 2 and "SHA256" in p.stderr and len(p.stderr.strip().splitlines()) == 1
