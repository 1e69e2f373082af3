"""trainrun.finetune: freezing by glob, BatchNorm held in eval mode, gradual unfreezing stages, layer-wise LR decay
(against timm's own param_groups_layer_decay) and LoRA through peft (adapter size, exactness at step 0, merge)."""
import copy

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from trainrun import finetune
from trainrun.config import FinetuneConfig, ModelConfig
from trainrun.errors import ConfigError
from trainrun.models import build_model


def section(**kw):
    cfg = OmegaConf.structured(FinetuneConfig)
    for key, value in kw.items():
        cfg[key] = value
    return cfg


def cnn(channels=(32, 64), num_classes=10, seed=0):
    torch.manual_seed(seed)
    model_cfg = OmegaConf.structured(ModelConfig)
    model_cfg.name = "cnn"
    model_cfg.channels = list(channels)
    return build_model(model_cfg, (1, 8, 8), num_classes, 0.0)


def prepared(model, steps_per_epoch=10, **kw):
    tuner = finetune.Finetuner(section(**kw), model, steps_per_epoch)
    tuner.prepare()
    return tuner


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ check()

@pytest.mark.parametrize("key,value,needle", [
    ("unfreeze_unit", "batch", "finetune.unfreeze_unit='batch': must be one of epoch, step"),
    ("layer_decay", 0.0, "finetune.layer_decay=0.0: must be in (0, 1]"),
    ("layer_decay", 1.5, "finetune.layer_decay=1.5: must be in (0, 1]"),
    ("head_lr", 0.0, "finetune.head_lr=0.0: must be > 0"),
    ("lora_rank", -1, "finetune.lora_rank=-1: must be >= 0"),
    ("lora_alpha", 0.0, "finetune.lora_alpha=0.0: must be > 0"),
    ("lora_dropout", 1.0, "finetune.lora_dropout=1.0: must be in [0, 1)"),
    ("unfreeze_at", {"layer4.*": 0}, "finetune.unfreeze_at['layer4.*']=0: must be a whole number >= 1"),
    ("lora_targets", ["fc1"], "finetune.lora_targets=['fc1']: LoRA is off"),
])
def test_check_refuses_out_of_range_values(key, value, needle):
    with pytest.raises(ConfigError) as info:
        finetune.check(section(**{key: value}))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_check_accepts_a_full_section():
    finetune.check(section(layer_decay=1.0, head_lr=0.1, lora_rank=4, lora_dropout=0.1, lora_targets=["0"],
                           unfreeze_at={"0.*": 1}, unfreeze_unit="step"))


# ---------------------------------------------------------------------------------------------------- freezing

def test_freeze_sets_requires_grad_and_frozen_parameters_get_no_grad():
    model = cnn()
    tuner = prepared(model, freeze=["*"], train=["@head"])
    assert trainable(model) == ["15.weight", "15.bias"]
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in ("15.weight", "15.bias")), name
    counts = tuner.summary()
    assert counts == {"trainable": 64 * 10 + 10, "total": sum(p.numel() for p in model.parameters()),
                      "frozen": counts["total"] - 650, "lora": 0}


def test_freeze_globs_and_train_exceptions():
    model = cnn()
    prepared(model, freeze=["0.*", "1.*", "3.*", "4.*"], train=["4.bias"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"0.weight", "1.weight", "1.bias", "3.weight", "4.weight"}


def test_batchnorm_of_a_frozen_part_keeps_its_running_stats_through_train_mode():
    model = cnn()
    tuner = prepared(model, freeze=["0.*", "1.*"])
    assert tuner.held_batchnorm() == ["1"]
    frozen_bn, trained_bn = model[1], model[4]
    before_frozen = frozen_bn.running_mean.clone()
    before_trained = trained_bn.running_mean.clone()
    model.train()
    assert not frozen_bn.training and trained_bn.training
    model(torch.randn(8, 1, 8, 8) * 3 + 1)
    assert torch.equal(frozen_bn.running_mean, before_frozen) and frozen_bn.num_batches_tracked == 0
    assert not torch.equal(trained_bn.running_mean, before_trained)
    ema = copy.deepcopy(model)  # the hold survives a deep copy (EMA) and stays on the copy's own module
    ema.train()
    assert not ema[1].training and ema[4].training


def test_batchnorm_hold_is_off_with_freeze_bn_false():
    model = cnn()
    tuner = prepared(model, freeze=["0.*", "1.*"], freeze_bn=False)
    assert tuner.held_batchnorm() == []
    before = model[1].running_mean.clone()
    model.train()
    model(torch.randn(8, 1, 8, 8) + 1)
    assert not torch.equal(model[1].running_mean, before)


def test_head_token_on_builtin_torchvision_and_timm_models():
    import timm
    import torchvision

    assert finetune.head_names(cnn()) == ["15.weight", "15.bias"]
    assert finetune.head_names(torchvision.models.resnet18(num_classes=3)) == ["fc.weight", "fc.bias"]
    assert finetune.head_names(torchvision.models.squeezenet1_1(num_classes=3)) == \
        ["classifier.1.weight", "classifier.1.bias"]
    assert finetune.head_names(timm.create_model("resnet18", pretrained=False, num_classes=3)) == \
        ["fc.weight", "fc.bias"]
    names = ["a.weight", "fc.weight", "fc.bias"]
    assert finetune.expand(["@head", "a.*"], names, ["fc.weight", "fc.bias"], "finetune.freeze") == set(names)


def test_a_glob_matching_nothing_is_a_one_line_error_naming_key_pattern_and_examples():
    with pytest.raises(ConfigError) as info:
        prepared(cnn(), freeze=["layer1.*"])
    message = str(info.value)
    assert message.startswith("finetune.freeze: pattern 'layer1.*' matches no parameter")
    assert "0.weight" in message and "15.bias" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"finetune.unfreeze_at: pattern 'blocks\.\*'"):
        prepared(cnn(), unfreeze_at={"blocks.*": 2})
    with pytest.raises(ConfigError, match="'@head' names the classifier, but trainrun finds no classifier"):
        finetune.expand(["@head"], ["0.weight"], [], "finetune.train")


# -------------------------------------------------------------------------------------------- gradual unfreezing

def test_stages_in_epochs_unfreeze_at_their_thresholds():
    model = cnn()
    tuner = prepared(model, steps_per_epoch=5, freeze=["*"], train=["@head"],
                     unfreeze_at={"0.*": 2, "10.*": 1, "11.*": 1})
    assert tuner.stages == [(5, ["10.weight", "11.weight", "11.bias"]), (10, ["0.weight"])]
    assert trainable(model) == ["15.weight", "15.bias"]
    assert tuner.held_batchnorm() == ["1", "4", "8", "11"]
    assert tuner.due(4) == []
    first = tuner.due(5)
    assert first == [tuner.stages[0]]
    new = tuner.unfreeze(first[0])
    params = dict(model.named_parameters())
    assert [p is params[n] for p, n in zip(new, ["10.weight", "11.weight", "11.bias"])] == [True] * 3
    assert len(new) == 3
    assert tuner.held_batchnorm() == ["1", "4", "8"]
    model.train()
    assert model[11].training and not model[8].training
    assert tuner.due(9) == [] and tuner.due(10) == [tuner.stages[1]]
    assert [p is params["0.weight"] for p in tuner.unfreeze(tuner.stages[1])] == [True]
    assert tuner.due(1000) == []
    assert trainable(model) == ["0.weight", "10.weight", "11.weight", "11.bias", "15.weight", "15.bias"]


def test_stages_in_steps_freeze_their_parameters_even_when_freeze_is_empty():
    model = cnn()
    tuner = prepared(model, steps_per_epoch=100, unfreeze_at={"1.*": 3, "*.bias": 7}, unfreeze_unit="step")
    # a parameter two globs match trains from the earlier threshold
    assert tuner.stages == [(3, ["1.weight", "1.bias"]), (7, ["4.bias", "8.bias", "11.bias", "15.bias"])]
    assert not model[1].weight.requires_grad and not model[15].bias.requires_grad
    assert model[0].weight.requires_grad
    # a resume past both thresholds applies both before the optimizer state is loaded
    due = tuner.due(50)
    assert due == tuner.stages
    assert sum(len(tuner.unfreeze(stage)) for stage in due) == 6
    assert all(p.requires_grad for p in model.parameters())


# -------------------------------------------------------------------------------------------- layer-wise decay

def timm_scales(model, decay):
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, layer_decay=decay)
    by_identity = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    return {name: by_identity[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_layer_decay_matches_timm_per_parameter(arch):
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=7)
    ours = finetune.lr_scales(model, 0.75)
    theirs = timm_scales(model, 0.75)
    assert ours == theirs
    assert len(set(theirs.values())) > 5  # a real spread of layers, not one group
    ids, num_layers = finetune.layer_ids(model)
    assert {n: finetune.layer_scale(i, num_layers, 0.75) for n, i in ids.items()} == theirs


def test_layer_decay_fallback_on_the_builtin_cnn():
    ids, num_layers = finetune.layer_ids(cnn())
    # conv+BN per layer (the BN joins its conv), the head last
    assert num_layers == 5
    assert ids == {"0.weight": 0, "1.weight": 0, "1.bias": 0, "3.weight": 1, "4.weight": 1, "4.bias": 1,
                   "7.weight": 2, "8.weight": 2, "8.bias": 2, "10.weight": 3, "11.weight": 3, "11.bias": 3,
                   "15.weight": 4, "15.bias": 4}
    assert finetune.layer_scale(0, num_layers, 0.5) == 0.0625 and finetune.layer_scale(4, num_layers, 0.5) == 1.0


def test_layer_decay_fallback_root_parameters_join_the_first_layer():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.zeros(4))
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)])
            self.head = nn.Linear(4, 2)

    ids, num_layers = finetune.layer_ids(Tokens())
    assert num_layers == 3
    assert ids == {"cls": 0, "blocks.0.weight": 0, "blocks.0.bias": 0, "blocks.1.weight": 0, "blocks.1.bias": 0,
                   "blocks.2.weight": 1, "blocks.2.bias": 1, "head.weight": 2, "head.bias": 2}


# ---------------------------------------------------------------------------------------------------------- LoRA

def adapter_size(module, rank):
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features)
    kh, kw = module.kernel_size  # peft: lora_A conv(in, r, k x k), lora_B 1x1 conv(r, out), no bias
    return rank * module.in_channels * kh * kw + rank * module.out_channels


class Mixed(nn.Module):
    """Conv2d and Linear layers, a nested Sequential whose names end like the outer ones, and a head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.body = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 16), nn.GELU()))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.body(self.features(x)))


def lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Mixed()
    base = copy.deepcopy(model)
    tuner = prepared(model, **{"lora_rank": 4, "lora_alpha": 8.0, **kw})
    return base, model, tuner


def test_lora_adapts_every_linear_and_conv_but_the_head_with_peft_sized_adapters():
    base, model, tuner = lora_model()
    assert tuner.lora_modules == ["features.0", "features.3", "body.0", "body.2.0"]
    expected = sum(adapter_size(base.get_submodule(name), 4) for name in tuner.lora_modules)
    counts = tuner.summary()
    assert counts["lora"] == expected == 4 * (9 + 6) + 4 * (54 + 8) + 4 * (32 + 16) + 4 * (16 + 16)
    assert counts["trainable"] == expected + 16 * 3 + 3  # adapters + the head, base frozen
    assert counts["total"] == sum(p.numel() for p in base.parameters()) + expected
    assert set(trainable(model)) == set(finetune.lora_names(model)) | {"fc.weight", "fc.bias"}
    assert tuner.held_batchnorm() == ["features.1"]


def test_lora_targets_are_exact_names_not_suffixes():
    _, model, tuner = lora_model(lora_targets=["body.0"])
    assert tuner.lora_modules == ["body.0"]
    assert finetune._is_lora_layer(model.body[0]) and isinstance(model.body[2][0], nn.Linear)
    _, model, tuner = lora_model(lora_targets=["features.*"])
    assert tuner.lora_modules == ["features.0", "features.3"]
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    assert prepared(nested, lora_rank=2, lora_targets=["0"]).lora_modules == ["0"]
    assert finetune._is_lora_layer(nested[0]) and type(nested[1][0]) is nn.Linear  # peft's list form would wrap it


def test_lora_target_errors_name_the_pattern_and_why():
    with pytest.raises(ConfigError, match=r"pattern 'fc' matches only fc, which is the classifier head"):
        lora_model(lora_targets=["fc"])
    with pytest.raises(ConfigError, match=r"pattern 'blocks\.\*' matches no nn.Linear or nn.Conv2d.*body\.2\.0"):
        lora_model(lora_targets=["blocks.*"])
    attention = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    assert finetune.lora_candidates(attention)["0.out_proj"].startswith("is the output projection")
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        finetune.lora_targets(attention, ["*out_proj"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="grouped convolution"):
        finetune.lora_targets(grouped, ["0"])


def test_lora_output_at_step_zero_is_the_base_models():
    base, model, _ = lora_model()
    x = torch.randn(5, 1, 6, 6)
    base.eval(), model.eval()
    assert torch.equal(model(x), base(x))


def test_lora_merge_after_a_step_equals_the_unmerged_model_with_the_base_keys():
    base, model, _ = lora_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(5, 1, 6, 6)
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    optimizer.step()
    model.eval()
    unmerged = model(x).detach()
    assert not torch.allclose(unmerged, base.eval()(x), atol=1e-4)  # the adapters did move the output
    merged = finetune.merge_lora(model)
    assert merged is model and finetune.lora_names(model) == []
    assert list(model.state_dict()) == list(base.state_dict())
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    assert type(model.body[0]) is nn.Linear and type(model.features[0]) is nn.Conv2d


def test_lora_is_deterministic_for_a_seed_also_with_dropout():
    def outputs(seed):
        _, model, _ = lora_model(seed=0, lora_dropout=0.5)
        with torch.no_grad():
            for name in finetune.lora_names(model):
                if ".lora_B." in name:
                    model.get_parameter(name).fill_(0.1)  # so the dropped adapter input shows in the output
        model.train()
        torch.manual_seed(seed)
        return model(torch.ones(2, 1, 6, 6)), dict(model.named_parameters())

    first, first_params = outputs(1)
    second, second_params = outputs(1)
    third, _ = outputs(2)
    assert torch.equal(first, second)
    assert all(torch.equal(first_params[n], second_params[n]) for n in first_params)
    assert not torch.equal(first, third)  # dropout really draws from the seeded RNG


def test_lora_with_freeze_globs_on_top():
    _, model, tuner = lora_model(freeze=["features.*"], train=["body.0.base_layer.bias"])
    names = set(trainable(model))
    assert not any(n.startswith("features.") for n in names)
    assert "body.0.base_layer.bias" in names and "body.0.lora_A.default.weight" in names
    assert tuner.summary()["lora"] == 4 * (32 + 16) + 4 * (16 + 16) + 4 * (9 + 6) + 4 * (54 + 8)
