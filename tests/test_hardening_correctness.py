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


# --- 29: init=gpt2 scales the ViT's residual projections and is refused where nothing is marked ---

def test_gpt2_init_scales_the_vit_residual_projections():
    from omegaconf import OmegaConf
    from trainrun.init import apply_init
    from trainrun.models import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": "vit", "patch_size": 4, "width": 192, "layers": 3, "heads": 3, "mlp_ratio": 4.0})
    model = build_model(cfg, (1, 8, 8), 10, 0.0)
    assert torch.all(model.heads.head.weight == 0)  # torchvision's zero head, before gpt2
    apply_init(model, OmegaConf.create({"name": "gpt2", "std": 0.02, "zero_init_residual": False,
                                        "zero_init_head": False}))
    marked = [n for n, m in model.named_modules() if getattr(m, "_residual_projection", False)]
    assert len(marked) == 6 and sum("out_proj" in n for n in marked) == 3 and sum("mlp.3" in n for n in marked) == 3
    scaled = 0.02 / math.sqrt(2 * 3)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            want = scaled if name in marked else 0.02
            assert m.weight.std().item() == pytest.approx(want, rel=0.05), name
    assert model.encoder.layers[0].self_attention.in_proj_weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet18"])
def test_gpt2_init_is_refused_on_models_without_residual_projections(cli, model):
    p = cli(f"model={model}", "init=gpt2", "trainer.max_steps=2", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: init=gpt2 scales the residual projections")


def test_gpt2_init_trains_a_vit_through_the_cli(cli):
    p = cli("model=vit_tiny", "init=gpt2", "model.layers=2", "model.width=32", "model.heads=2",
            "trainer.max_steps=2", "mode=init_report")
    assert p.returncode == 0


# --- 31: activation gains, FSDP2 memory plan ---------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_kaiming_gain_is_the_activations_second_moment_gain(activation):
    from trainrun.init import gain

    f = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[activation]
    z = torch.linspace(-14, 14, 400_001, dtype=torch.float64)
    density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    second_moment = torch.trapezoid(f(z) ** 2 * density, z).item()
    assert gain(activation) ** 2 * second_moment == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("scheme", ["kaiming_normal", "kaiming_uniform"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_kaiming_init_draws_with_the_activations_gain(scheme, activation):
    from omegaconf import OmegaConf
    from trainrun.init import apply_init, gain

    torch.manual_seed(0)
    layer = nn.Linear(512, 1024)
    apply_init(layer, OmegaConf.create({"name": scheme, "zero_init_residual": False, "zero_init_head": False}),
               activation)
    assert layer.weight.std().item() == pytest.approx(gain(activation) / math.sqrt(512), rel=0.01)


def test_memory_plan_divides_the_sharded_parts_by_the_world_size():
    from trainrun.diagnostics import memory_plan

    model = nn.Linear(100, 10)
    one, four = memory_plan(model, "adamw", 0.0, "bf16"), memory_plan(model, "adamw", 0.0, "bf16", shards=4)
    assert one["bytes_per_param"] == 16.0 and four["bytes_per_param"] == 4.0
    assert four["total"] * 4 == one["total"] and four["params"] == one["params"] == 1010


# --- 34: the doctor words its label probe as evidence, with numbers, and asserts only what they support ---

def _deterministic_labels(path, scale=1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, 8, 8, generator=g)
    x[:, 0, 0, :2] *= scale
    y = (x[:, 0, 0, 0] > 0).long() * 2 + (x[:, 0, 0, 1] > 0).long()  # a function of two input values
    torch.save({"x": x, "y": y}, path)


def test_doctor_does_not_blame_labels_that_are_a_function_of_the_inputs(cli):
    # the 1-NN probe sees only a weak signal here (two of 64 input values decide the label): ~35% vs 25% chance
    _deterministic_labels(cli.dir / "det.pt")
    p = cli("data=tensors", "data.root=det.pt", "model=mlp", "optimizer=sgd", "optimizer.lr=1e-9",
            "schedule=constant", "trainer.max_steps=4", "trainer.eval_every=4")
    assert "chance level" in p.stdout, p.stdout[-2000:]
    assert "do not go with the inputs" not in p.stdout
    line = next(l for l in p.stdout.splitlines() if "doctor:" in l and "chance level" in l)
    assert "but the data is learnable" in line and "val samples (chance 2" in line and "one-sided p" in line
    print(line)


def test_doctor_reports_permuted_labels_as_evidence_with_numbers(cli):
    p = cli("+fault=permuted_labels", "trainer.max_steps=22", "trainer.eval_every=22")
    line = next(l for l in p.stdout.splitlines() if "doctor:" in l and "chance level" in l)
    assert "evidence that the training labels do not go with the inputs" in line
    import re

    n, chance = re.search(r"on (\d+) val samples \(chance (\d+\.\d)%\)", line).groups()
    assert int(n) == 359 and abs(float(chance) - 10) < 0.5 and "no better than random labels (z = " in line


def test_label_probe_statistics():
    from trainrun.doctor import LabelProbe

    at_chance, signal = LabelProbe(0.109, 359, 0.1), LabelProbe(0.338, 400, 0.25)
    assert at_chance.at_chance and at_chance.z == pytest.approx(0.57, abs=0.01)
    assert not signal.at_chance and signal.z == pytest.approx(4.06, abs=0.01)
    assert "one-sided p = 2.4e-05" in signal.p_text()


# --- 35: output noise ------------------------------------------------------------------------------

def test_config_tree_prints_the_selected_models_keys_and_no_empty_groups(cli):
    p = cli("model=mlp", "model.channels=[8]", "model.hidden_sizes=[32]", "trainer.max_steps=1")
    tree = p.stdout[p.stdout.index("config (non-default values)"):p.stdout.index("\ndata: ")]
    assert "model: mlp" in tree and "hidden_sizes: [32]" in tree
    assert "channels" not in tree  # a cnn key: the mlp does not read it
    for group in ("regularization", "checkpoint", "lr_find", "doctor"):  # nothing set in them
        assert group not in tree, tree
    assert "trainer" in tree and "max_steps: 1" in tree


@pytest.mark.parametrize("value, text", [(80.0, "80"), (12.52, "12.52"), (0.150417, "0.1504"), (2.29560, "2.2956"),
                                         (0.0, "0"), (5e-4, "5.000e-04"), (326.4, "326"), (1.5e6, "1500000"),
                                         (7, "7"), (float("nan"), "nan")])
def test_numbers_print_without_trailing_zeros(value, text):
    from trainrun.logging import _fmt

    assert _fmt(value) == text


def test_the_huge_lr_diagnosis_prints_once(cli):
    p = cli("+fault=huge_lr", "mode=overfit_batch", "doctor.overfit_steps=40", check=False)
    assert p.returncode == 1
    assert p.stdout.count("learning rate too high") == 1, p.stdout[-3000:]
    assert "likely cause: the doctor's finding above" in p.stdout
    assert "learning rate too high" in p.stderr.strip().splitlines()[-1]  # the one-line error still names it


@pytest.mark.parametrize("width", [80, 120])
def test_progress_bar_keeps_step_count_and_eta_when_metrics_show(tmp_path, monkeypatch, width):
    import io
    import re

    from rich.console import Console

    from conftest import structured
    from trainrun import logging as tl
    from trainrun.config import LoggerConfig

    buf = io.StringIO()
    monkeypatch.setattr(tl, "console", lambda: Console(file=buf, width=width, force_terminal=True, color_system=None))
    logger = tl.RunLogger(structured(LoggerConfig, progress="bar", plots=False), tmp_path, 330, 0, {}, None)
    logger.log(120, {"epoch": 5, "train/loss": 2.2367, "train/acc": 0.1719, "lr": 5e-4, "samples_per_s": 326.0,
                     "grad_norm": 1.0986, "peak_mem_mb": 756.0, "loss_scale": 65536.0})
    logger.progress.refresh()
    logger.close()
    last = [l for l in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n").splitlines()
            if "train" in l][-1]
    assert "120/330" in last and re.search(r"eta (-:--:--|\d+:\d\d:\d\d) train/loss", last) and "train/loss 2.2367" in last, last
    assert len(last) <= width


def test_recipe_headers_are_paragraphs_that_rich_wraps():
    import subprocess
    import sys

    from trainrun.cli import recipe_headers

    headers = recipe_headers()
    assert headers["digits_cnn"].splitlines()[0].endswith("15 epochs (330 steps).")  # 2 comment lines, 1 paragraph
    assert len(headers["resnet50_bf16"].splitlines()) == 3  # Reproduces / Data / Measured here
    for width in (80, 120):
        out = subprocess.run([sys.executable, "-c", "from trainrun.cli import list_recipes_main; list_recipes_main()"],
                             env={**__import__("os").environ, "COLUMNS": str(width)}, capture_output=True,
                             text=True, check=True).stdout
        assert {len(l) for l in out.splitlines()[1:] if l.strip()} == {width}  # every table row spans the width
