"""Regularization techniques against their formulas / torch references, and through the CLI."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import structured, read_jsonl, sha_of
from trainrun.config import RegularizationConfig
from trainrun.errors import ConfigError
from trainrun.regularization import (EMA, BatchAugment, EarlyStopping, FocalLoss, add_stochastic_depth, build_loss,
                                     class_weights, stochastic_depth_rates)

os.environ.setdefault("WANDB_MODE", "disabled")


def reg(**kw):
    return structured(RegularizationConfig, **kw)


# --- losses ----------------------------------------------------------------------------------

def test_focal_loss_matches_the_formula_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    p = F.softmax(logits, 1)
    pt = p[torch.arange(2), y]
    expected = (-(1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(FocalLoss(2.0)(logits, y), expected)


def test_focal_with_gamma_zero_is_cross_entropy_also_with_weights_and_smoothing():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(FocalLoss(0.0)(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(FocalLoss(0.0, label_smoothing=0.1)(logits, y),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    # with class weights torch divides by N for probability targets: compare on one-hot probabilities
    onehot = F.one_hot(y, 5).float()
    torch.testing.assert_close(FocalLoss(0.0, weight=w)(logits, onehot), F.cross_entropy(logits, onehot, weight=w))


def test_focal_down_weights_easy_examples():
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    y = torch.tensor([0])
    ratio_focal = FocalLoss(2.0)(easy, y) / FocalLoss(2.0)(hard, y)
    ratio_ce = F.cross_entropy(easy, y) / F.cross_entropy(hard, y)
    assert ratio_focal < ratio_ce / 10


def test_build_loss_options():
    assert isinstance(build_loss(reg(loss="focal")), FocalLoss)
    ce = build_loss(reg(label_smoothing=0.1))
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.label_smoothing == 0.1


def test_balanced_class_weights_are_n_over_k_nc():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(reg(balance_classes=True), y, 3)
    torch.testing.assert_close(w, torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]))
    assert torch.equal(class_weights(reg(class_weights=[1.0, 2.0, 3.0]), y, 3), torch.tensor([1.0, 2.0, 3.0]))
    assert class_weights(reg(), y, 3) is None
    with pytest.raises(ConfigError, match="one weight per class"):
        class_weights(reg(class_weights=[1.0, 2.0]), y, 3)
    with pytest.raises(ConfigError, match="no training samples"):
        class_weights(reg(balance_classes=True), y, 4)


# --- MixUp / CutMix / random erasing ---------------------------------------------------------

def _batch(n=8, k=4):
    torch.manual_seed(1)
    return torch.rand(n, 3, 16, 16), torch.arange(n) % k


def test_mixup_mixes_with_the_rolled_batch_by_one_lambda():
    x, y = _batch()
    torch.manual_seed(3)
    xm, t = BatchAugment(reg(mixup_alpha=0.4), 4)(x.clone(), y)
    lam = float(t[0, y[0]])  # y[0] != y[-1], so the target keeps lam on the own class
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))
    expected = lam * F.one_hot(y, 4) + (1 - lam) * F.one_hot(y.roll(1, 0), 4)
    torch.testing.assert_close(t, expected.float())


def test_cutmix_pastes_one_box_and_targets_follow_its_area():
    x, y = _batch()
    torch.manual_seed(5)
    xm, t = BatchAugment(reg(cutmix_alpha=1.0), 4)(x.clone(), y)
    from_rolled = (xm == x.roll(1, 0)).all(1) & (xm != x).any(1)  # [N, H, W] pixels taken from the partner
    area = from_rolled[0].float().mean()
    assert torch.equal(from_rolled[0], from_rolled[-1])  # one box for the whole batch
    lam_adj = 1 - area
    torch.testing.assert_close(t[0, y[0]], lam_adj, atol=1e-6, rtol=0)
    assert ((xm == x) | (xm == x.roll(1, 0))).all()


@pytest.mark.parametrize("switch_prob, expect_cutmix", [(1.0, True), (0.0, False)])
def test_switch_between_cutmix_and_mixup(switch_prob, expect_cutmix):
    x, y = _batch()
    aug = BatchAugment(reg(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=switch_prob), 4)
    for seed in range(5):
        torch.manual_seed(seed)
        xm, _ = aug(x.clone(), y)
        is_cutmix = bool(((xm == x) | (xm == x.roll(1, 0))).all())
        assert is_cutmix == expect_cutmix


def test_mix_prob_zero_leaves_the_batch_alone_and_random_erasing_erases_each_sample():
    x, y = _batch()
    xm, t = BatchAugment(reg(mixup_alpha=0.4, mix_prob=0.0), 4)(x.clone(), y)
    assert torch.equal(xm, x) and torch.equal(t, y)
    torch.manual_seed(0)
    xe, t = BatchAugment(reg(random_erasing=1.0), 4)(x.clone(), y)
    assert torch.equal(t, y)
    erased = (xe != x).flatten(1).any(1)
    assert erased.all() and ((xe == 0) | (xe == x)).all()
    assert not BatchAugment(reg(), 4).enabled


# --- stochastic depth ------------------------------------------------------------------------

def test_stochastic_depth_linear_rates_and_per_sample_branch_drop():
    import torchvision

    assert stochastic_depth_rates(0.2, 4) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert add_stochastic_depth(model, 0.5) == 8
    assert list(model.state_dict()) == keys  # hooks only: checkpoints stay compatible
    x = torch.randn(4, 3, 32, 32)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x))  # no dropping at eval
    seen = []
    last = model.layer4[1].bn2
    last.register_forward_hook(lambda m, i, out: seen.append(out.flatten(1).abs().sum(1) == 0))
    model.train()
    torch.manual_seed(1)
    model(torch.randn(400, 3, 8, 8))
    dropped = seen[-1].float().mean()
    assert 0.4 < dropped < 0.6  # the last of 8 blocks drops with p = 0.5
    with pytest.raises(ConfigError, match="residual"):
        add_stochastic_depth(nn.Sequential(nn.Linear(2, 2)), 0.1)


# --- EMA -------------------------------------------------------------------------------------

def test_ema_matches_torch_averaged_model_and_the_formula():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMA(model, 0.9, warmup=False)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ref.update_parameters(model)  # torch's first update copies; ours starts from that same copy at construction
    w0 = model[0].weight.detach().clone()
    hand = w0.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model.train()
        loss = model(torch.randn(8, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        ref.update_parameters(model)
        hand = 0.9 * hand + 0.1 * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, hand)
    for (k, a), (_, b) in zip(ema.module.state_dict().items(), ref.module.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=k)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_decay_and_state_round_trip(tmp_path):
    model = nn.Linear(2, 2)
    ema = EMA(model, 0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    torch.save(ema.state_dict(), tmp_path / "e.pt")
    other = EMA(model, 0.999)
    other.load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True))
    assert other.updates == 3 and other.current_decay() == pytest.approx(4 / 13)


# --- early stopping --------------------------------------------------------------------------

def test_early_stopping_patience_min_delta_and_best_weights():
    model = nn.Linear(1, 1)
    es = EarlyStopping(patience=2, min_delta=0.01, mode="max", keep_best_weights=True)
    values = [0.5, 0.7, 0.705, 0.69, 0.8]
    stops = []
    for step, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(step)
        stops.append(es.step(v, step, model))
    # 0.705 is not better than 0.7 + 0.01; 0.69 neither -> stop at the 4th evaluation
    assert stops == [False, False, False, True, False]
    assert es.best == 0.8 or stops.index(True) == 3
    es2 = EarlyStopping(patience=2, min_delta=0.0, mode="min", keep_best_weights=True)
    for step, v in enumerate([3.0, 2.0, float("nan"), 2.5]):
        with torch.no_grad():
            model.weight.fill_(step)
        stopped = es2.step(v, step, model)
    assert stopped and es2.best == 2.0 and es2.best_step == 1
    assert float(es2.best_weights["weight"]) == 1.0


# --- through the CLI -------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["regularization.mixup_alpha=0.2", "regularization.cutmix_alpha=1.0"],
    ["regularization.random_erasing=0.25"],
    ["regularization.loss=focal", "regularization.balance_classes=true"],
    ["regularization.class_weights=[1,1,1,1,1,1,1,1,1,2]", "regularization.label_smoothing=0.1"],
    ["model=resnet18", "regularization.stochastic_depth=0.1", "data.batch_size=16"],
    ["regularization.dropout=0.3", "model=mlp"],
])
def test_each_regularizer_trains_through_the_cli(cli, args):
    p = cli(*args, "trainer.max_steps=4", "trainer.eval_every=4")
    assert "trainrun: finished" in p.stdout


def test_ema_is_used_for_eval_and_saved(cli):
    cli("run_name=e", "regularization.ema_decay=0.9", "trainer.max_steps=10", "trainer.eval_every=5")
    rows = [r for r in read_jsonl(cli.dir / "runs/e/metrics.jsonl") if "val/acc" in r]
    assert all("val_raw/acc" in r for r in rows)
    st = torch.load(cli.dir / "runs/e/checkpoints/step_000000010/state.pt", weights_only=True)
    assert st["ema"]["updates"] == 10
    assert any(not torch.equal(st["ema"]["module"][k], st["model"][k]) for k in st["model"])


def test_early_stopping_stops_restores_best_and_stays_done(cli):
    # LR 0 after warmup-free constant schedule: the val loss never improves, so patience 2 stops at eval 3
    args = ["run_name=es", "schedule=constant", "optimizer=sgd", "optimizer.lr=1e-9", "trainer.max_steps=100",
            "trainer.eval_every=5", "regularization.early_stopping_patience=2", "checkpoint.monitor=val/loss",
            "checkpoint.monitor_mode=min", "regularization.early_stopping_min_delta=0.1"]
    p = cli(*args)
    assert "early stopping at step 15" in p.stdout and "restored the best weights (step 5)" in p.stdout
    st = torch.load(cli.dir / "runs/es/checkpoints/step_000000015/state.pt", weights_only=True)
    assert st["trainer"]["stopped_early"] is True
    best = st["early_stopping"]["best_weights"]
    assert all(torch.equal(best[k], st["model"][k]) for k in best)
    p = cli("resume=runs/es", *args[1:])
    assert "already complete" in p.stdout


def test_resume_is_exact_with_rng_consuming_regularizers_and_curriculum(cli):
    common = ["model=mlp", "model.dropout=0.1", "regularization.mixup_alpha=0.2", "regularization.cutmix_alpha=1.0",
              "regularization.random_erasing=0.25", "regularization.ema_decay=0.9", "curriculum=mixed",
              "trainer.max_steps=60", "trainer.ckpt_every=10", "trainer.eval_every=10",
              "regularization.early_stopping_patience=50"]
    cli("run_name=straight", *common)
    cli("run_name=split", *common, "trainer.stop_at_step=29")  # mid-epoch 1 (22 steps per epoch)
    cli("resume=runs/split", *common)
    assert sha_of(cli.dir / "runs/straight", 60) == sha_of(cli.dir / "runs/split", 60)
    st = torch.load(cli.dir / "runs/split/checkpoints/step_000000060/state.pt", weights_only=True)
    assert {"ema", "early_stopping", "curriculum"} <= set(st)


def test_curriculum_options_train_and_key_uses_the_data_difficulty(cli):
    for c in ("loss", "confidence", "self_paced", "anti"):
        p = cli(f"curriculum={c}", "trainer.max_steps=30", "trainer.eval_every=30")
        assert "trainrun: finished" in p.stdout
    x, y = torch.randn(200, 1, 4, 4), torch.arange(200) % 4
    torch.save({"x": x, "y": y, "difficulty": torch.arange(200).float()}, cli.dir / "d.pt")
    p = cli("data=tensors", "data.root=d.pt", "curriculum=key", "data.batch_size=16", "trainer.max_steps=12",
            "trainer.eval_every=12")
    assert "trainrun: finished" in p.stdout
    p = cli("curriculum=key", "trainer.max_steps=2", check=False)
    assert p.returncode == 2 and "difficulty" in p.stderr
