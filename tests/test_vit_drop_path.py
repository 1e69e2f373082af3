"""Stochastic depth for the ViT blocks (regularization.stochastic_depth with model=vit_tiny): timm's drop_path_rate
semantics, checked against timm's own VisionTransformer carrying the same weights under the same seed; a resumed run
stays exact (the masks draw from the checkpointed global RNG)."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import sha_of
from trainrun.errors import ConfigError
from trainrun.models.vit import drop_path_rates, vit
from trainrun.regularization import add_stochastic_depth

timm_vit = pytest.importorskip("timm.models.vision_transformer")

SIZES = dict(patch_size=2, width=16, layers=4, heads=2, mlp_ratio=2.0)


def _trainrun_vit(input_shape=(3, 8, 8)):
    torch.manual_seed(0)
    model = vit(OmegaConf.create(SIZES), input_shape, 10, dropout=0.0)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: the logits would all be 0
    return model


def _timm_twin(tv, rate):
    """timm's VisionTransformer with `tv`'s weights (torchvision names -> timm names)."""
    model = timm_vit.VisionTransformer(img_size=8, patch_size=2, in_chans=3, num_classes=10, embed_dim=16, depth=4,
                                       num_heads=2, mlp_ratio=2.0, qkv_bias=True, drop_path_rate=rate)
    src = tv.state_dict()
    state = {"patch_embed.proj.weight": src["conv_proj.weight"], "patch_embed.proj.bias": src["conv_proj.bias"],
             "cls_token": src["class_token"], "pos_embed": src["encoder.pos_embedding"],
             "norm.weight": src["encoder.ln.weight"], "norm.bias": src["encoder.ln.bias"],
             "head.weight": src["heads.head.weight"], "head.bias": src["heads.head.bias"]}
    names = {"ln_1": "norm1", "self_attention.in_proj_": "attn.qkv.", "self_attention.out_proj": "attn.proj",
             "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    for key, value in src.items():
        if key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key[len("encoder.layers.encoder_layer_"):].split(".", 1)
            for old, new in names.items():
                rest = rest.replace(old, new) if rest.startswith(old) else rest
            state[f"blocks.{index}.{rest}"] = value
    model.load_state_dict(state, strict=True)
    return model


def test_rates_are_timms_linspace_from_zero_to_the_rate():
    model = timm_vit.VisionTransformer(img_size=8, patch_size=2, embed_dim=16, depth=5, num_heads=2,
                                       drop_path_rate=0.3)
    timm_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert drop_path_rates(0.3, 5) == pytest.approx(timm_rates, abs=0) and timm_rates[0] == 0.0


def test_drop_path_equals_timms_vision_transformer_with_the_same_seed():
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tv = _trainrun_vit()
    reference = _timm_twin(tv, 0.3)
    with torch.no_grad():
        tv.eval()
        reference.eval()
        torch.testing.assert_close(tv(x), reference(x), rtol=1e-4, atol=1e-5)  # same network without drop path
        plain = tv(x)
        assert add_stochastic_depth(tv, 0.3) == 4
        tv.train()
        reference.train()
        torch.manual_seed(7)
        dropped = tv(x)
        torch.manual_seed(7)
        expected = reference(x)
        torch.testing.assert_close(dropped, expected, rtol=1e-4, atol=1e-5)  # the same per-sample masks
        assert (dropped - plain).abs().amax(1).gt(1e-3).sum() > 8  # and they did drop branches of many samples
        torch.manual_seed(8)
        assert not torch.allclose(tv(x), expected, rtol=1e-4, atol=1e-5)  # another seed, other masks
        tv.eval()
        torch.testing.assert_close(tv(x), plain)  # evaluation never drops


def test_models_without_blocks_are_still_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"regularization.stochastic_depth needs a model with residual blocks "
                                          r"\(resnet18/resnet50, vit_tiny\); set it to 0 for this model"):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)


def test_resume_is_exact_with_vit_drop_path(tmp_path, monkeypatch):
    from test_ema_interval import _run

    monkeypatch.chdir(tmp_path)
    common = ["model=vit_tiny", "model.patch_size=2", "model.width=16", "model.layers=3", "model.heads=2",
              "regularization.stochastic_depth=0.3", "data.batch_size=32", "data.limit_train=256",
              "data.limit_val=64", "trainer.max_steps=6", "trainer.ckpt_every=6", "trainer.eval_every=6"]
    _run([*common, "run_name=straight"], tmp_path / "runs/straight")
    _run([*common, "run_name=split", "trainer.stop_at_step=3"], tmp_path / "runs/split")
    _run([*common, "run_name=split", f"resume={tmp_path / 'runs/split'}"], tmp_path / "runs/split")
    assert sha_of(tmp_path / "runs/straight", 6) == sha_of(tmp_path / "runs/split", 6)
