"""trainer.channels_last and trainer.compile: same training, checkpoints without wrapper prefixes."""
import pytest
import torch

from conftest import FAST, read_jsonl, run_cli
from trainrun import checkpoint
from trainrun.loop import _to_device


def test_channels_last_moves_4d_inputs_only():
    x = torch.randn(2, 3, 8, 8)
    assert _to_device(x, torch.device("cpu"), True).is_contiguous(memory_format=torch.channels_last)
    assert not _to_device(x, torch.device("cpu"), False).is_contiguous(memory_format=torch.channels_last)
    flat = torch.randn(2, 64)
    assert _to_device(flat, torch.device("cpu"), True).is_contiguous()


def _final(tmp_path, name, *args):
    # SGD: its update is linear in the gradient, so float reordering stays ~1e-6 (Adam's normalised step
    # would blow near-zero gradient differences up to a full lr-sized step)
    run_cli(tmp_path, f"run_name={name}", "trainer.max_steps=5", "data.limit_train=640", "optimizer=sgd",
            "optimizer.lr=0.05", *args, *FAST)
    state, _ = checkpoint.load(tmp_path / "runs" / name / "checkpoints" / "step_000000005")
    loss = [r["train/loss"] for r in read_jsonl(tmp_path / "runs" / name / "metrics.jsonl") if "train/loss" in r][-1]
    return state["model"], loss


def _assert_same_training(a, b):
    (wa, la), (wb, lb) = a, b
    assert list(wa) == list(wb)  # no `_orig_mod.` prefix, same keys
    assert la == pytest.approx(lb, rel=1e-4)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-5), k


def test_channels_last_trains_like_the_default_layout(tmp_path):
    _assert_same_training(_final(tmp_path, "nchw"), _final(tmp_path, "nhwc", "trainer.channels_last=true"))


@pytest.mark.slow  # torch.compile takes about a minute on 2 CPU cores
def test_compile_trains_like_eager(tmp_path):
    _assert_same_training(_final(tmp_path, "eager"), _final(tmp_path, "compiled", "trainer.compile=true"))
