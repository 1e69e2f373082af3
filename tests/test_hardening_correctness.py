"""Issue 12, part D: correctness found by review (EMA + early stopping, weighted soft-target CE, gpt2 init,
activation gains, FSDP2 memory plan), the doctor's wording, and output noise."""
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import read_jsonl


def _meta(run, step):
    return json.loads((run / "checkpoints" / f"step_{step:09d}" / "meta.json").read_text())


# --- 27: early stopping with EMA restores the weights it measured ------------------------------

def test_early_stopping_with_ema_restores_the_measured_ema_weights(cli):
    # min_delta 10 on val/loss: nothing after the first evaluation counts as better, so the best is step 5
    cli("run_name=ema_es", "regularization.ema_decay=0.9", "trainer.max_steps=100", "trainer.eval_every=5",
        "regularization.early_stopping_patience=2", "checkpoint.monitor=val/loss", "checkpoint.monitor_mode=min",
        "regularization.early_stopping_min_delta=10")
    run = cli.dir / "runs/ema_es"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    best = evals[0]
    assert best["step"] == 5 and best["val/loss"] != best["val_raw/loss"]  # EMA and raw weights differ
    final = _meta(run, 15)["metrics"]
    assert final["val/loss"] == pytest.approx(best["val/loss"], rel=1e-6)
    st = torch.load(run / "checkpoints/step_000000015/state.pt", weights_only=True)
    assert all(torch.equal(st["early_stopping"]["best_weights"][k], st["ema"]["module"][k]) for k in st["model"])


# --- 28: class-weighted cross-entropy has one scale for index and probability targets ----------

def _reg(**values):
    from conftest import structured
    from trainrun.config import RegularizationConfig

    return structured(RegularizationConfig, **values)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_ce_on_one_hot_targets_equals_torch_on_indices(smoothing):
    import torch.nn.functional as F
    from trainrun.regularization import build_loss

    torch.manual_seed(0)
    logits, y = torch.randn(32, 4), torch.randint(0, 4, (32,))
    w = torch.tensor([0.5, 1.0, 3.0, 7.0])
    loss = build_loss(_reg(label_smoothing=smoothing), w)
    expected = F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing)
    torch.testing.assert_close(loss(logits, y), expected)
    torch.testing.assert_close(loss(logits, F.one_hot(y, 4).float()), expected)
    # torch alone divides probability targets by N instead: the scale that jumped between batches
    assert not torch.allclose(F.cross_entropy(logits, F.one_hot(y, 4).float(), weight=w), expected)


def test_weighted_ce_on_mixup_targets_is_the_weighted_mean_of_both_label_terms():
    import torch.nn.functional as F
    from torchvision.transforms import v2
    from trainrun.regularization import build_loss

    torch.manual_seed(1)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    x = torch.randn(16, 1, 8, 8)
    _, soft = v2.MixUp(alpha=0.4, num_classes=5)(x, y)
    lam = float(soft[torch.arange(16), y].min())  # MixUp pairs each sample with the batch rolled by one
    y2 = y.roll(1)
    assert 0 < lam < 1
    w = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.5])
    nll = -F.log_softmax(logits, 1)
    num = lam * w[y] * nll[torch.arange(16), y] + (1 - lam) * w[y2] * nll[torch.arange(16), y2]
    den = lam * w[y] + (1 - lam) * w[y2]
    torch.testing.assert_close(build_loss(_reg(), w)(logits, soft), num.sum() / den.sum())
    assert type(build_loss(_reg(), None)) is nn.CrossEntropyLoss  # no weights: torch's loss, unchanged
