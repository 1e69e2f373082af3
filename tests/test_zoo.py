"""The torchvision and timm zoo factories: head and stem fit the data, small_input, meta-device builds, head_of, the
one-line config errors (unknown arch with close matches, missing arch, pretrained on a non-zoo model)."""
import pytest
import torch
import torch.nn as nn

from trainrun.config import ModelConfig
from trainrun.errors import ConfigError
from trainrun.models import MODELS, build_model, check, check_model_size
from trainrun.models.zoo import DropoutLinear, head_of

from conftest import structured

ZOOS = ("torchvision", "timm")


def zoo_cfg(zoo, **values):
    """As configs/model/{torchvision,timm}.yaml: arch resnet18, small_input false."""
    values = {"arch": "resnet18", "small_input": False, **values}
    return structured(ModelConfig, name=zoo, **values)


@pytest.mark.parametrize("zoo", ZOOS)
@pytest.mark.parametrize("small_input", [False, True])
def test_resnet18_on_one_channel_digits(zoo, small_input):
    model = build_model(zoo_cfg(zoo, small_input=small_input), (1, 28, 28), 10, 0.0)
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == ((3, 3) if small_input else (7, 7))
    assert isinstance(model.maxpool, nn.Identity) == small_input
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 1, 28, 28))
    assert out.shape == (1, 10)
    assert head_of(model) == "fc" and model.fc.out_features == 10


def test_small_input_keeps_resolution():
    """The stem without stride or max-pool: the last stage sees 28/8 -> 4 px instead of 28/32 -> 1 px."""
    sizes = {}
    for small in (False, True):
        model = build_model(zoo_cfg("torchvision", small_input=small), (1, 28, 28), 10, 0.0).eval()
        seen = []
        model.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        sizes[small] = seen[0]
    assert sizes == {False: 1, True: 4}


@pytest.mark.parametrize("zoo,arch", [("torchvision", "mobilenet_v3_small"), ("timm", "vit_tiny_patch16_224")])
def test_small_input_refused_for_other_archs(zoo, arch):
    with pytest.raises(ConfigError, match=r"model.small_input=true: applies to ResNet-family archs only") as e:
        build_model(zoo_cfg(zoo, arch=arch, small_input=True), (3, 32, 32), 10, 0.0)
    assert "\n" not in str(e.value)


def test_torchvision_stem_of_non_resnet_takes_the_input_channels():
    model = build_model(zoo_cfg("torchvision", arch="mobilenet_v3_small", small_input=False), (1, 64, 64), 7, 0.0)
    assert model.features[0][0].in_channels == 1  # the same path as in the pretrained file
    assert head_of(model) == "classifier.3"
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 7)


def test_torchvision_dropout_keeps_the_head_names():
    model = build_model(zoo_cfg("torchvision", small_input=True), (3, 8, 8), 10, 0.5)
    assert isinstance(model.fc, DropoutLinear) and model.fc.p == 0.5
    assert "fc.weight" in model.state_dict() and head_of(model) == "fc"
    features = torch.ones(2, 512)
    model.fc.train()
    assert (model.fc(features) != model.fc(features)).any()  # dropout active in training
    model.fc.eval()
    assert torch.equal(model.fc(features), nn.functional.linear(features, model.fc.weight, model.fc.bias))


def test_timm_head_and_dropout():
    assert build_model(zoo_cfg("timm"), (3, 8, 8), 5, 0.25).drop_rate == 0.25
    with torch.device("meta"):
        model = build_model(zoo_cfg("timm", arch="vit_tiny_patch16_224"), (3, 224, 224), 5, 0.0)
    assert head_of(model) == "head" and model.head.out_features == 5


def test_head_of_builtin_model():
    model = build_model(structured(ModelConfig, name="cnn"), (1, 8, 8), 3, 0.0)
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert head_of(model) == last_linear


@pytest.mark.parametrize("zoo", ZOOS)
def test_meta_device_build_counts_parameters(zoo):
    params = check_model_size(zoo_cfg(zoo, small_input=True), (1, 28, 28), 10)
    real = sum(p.numel() for p in build_model(zoo_cfg(zoo, small_input=True), (1, 28, 28), 10, 0.0).parameters())
    assert params == real
    with torch.device("meta"):
        model = build_model(zoo_cfg(zoo), (1, 28, 28), 10, 0.0)
    assert all(p.is_meta for p in model.parameters())


def test_registered_and_listed(monkeypatch, capsys):
    from trainrun.cli import list_models_main

    assert "torchvision" in MODELS and "timm" in MODELS
    monkeypatch.setattr("sys.argv", ["trainrun-models"])
    list_models_main()
    listing = " ".join(capsys.readouterr().out.split())
    assert "trainrun-models torchvision" in listing and "timm.list_models()" in listing
    for zoo in ZOOS:
        monkeypatch.setattr("sys.argv", ["trainrun-models", zoo])
        list_models_main()
        names = capsys.readouterr().out.splitlines()
        assert "resnet18" in names and len(names) > 50


@pytest.mark.parametrize("zoo,arch,close", [("torchvision", "resnet19", "resnet18"), ("timm", "resnet18x", "resnet18")])
def test_unknown_arch_is_one_line_with_close_matches(zoo, arch, close):
    with pytest.raises(ConfigError) as e:
        check(zoo_cfg(zoo, arch=arch))
    message = str(e.value)
    assert message.startswith(f"model.arch={arch}: not a {zoo} classification model; did you mean ")
    assert close in message and "trainrun-models lists how to see all" in message and "\n" not in message


def test_timm_unknown_tag_is_refused():
    check(zoo_cfg("timm", arch="resnet18.a1_in1k"))
    with pytest.raises(ConfigError, match=r"model.arch=resnet18.nope: not a timm"):
        check(zoo_cfg("timm", arch="resnet18.nope"))


def test_torchvision_detection_model_is_not_a_classifier():
    with pytest.raises(ConfigError, match=r"model.arch=fasterrcnn_resnet50_fpn: not a torchvision classification"):
        check(zoo_cfg("torchvision", arch="fasterrcnn_resnet50_fpn"))


@pytest.mark.parametrize("zoo", ZOOS)
def test_zoo_needs_an_arch(zoo):
    with pytest.raises(ConfigError, match=rf"model.arch='': model={zoo} needs the zoo's model name"):
        check(zoo_cfg(zoo, arch=""))


def test_pretrained_is_for_zoo_models_only():
    with pytest.raises(ConfigError, match=r"pretrained is for model=torchvision/timm.*model.name=cnn; use "
                                          r"model.weights=PATH for your own weights"):
        check(structured(ModelConfig, name="cnn", pretrained=True))
    check(structured(ModelConfig, name="cnn", weights="some/run"))  # own weights: fine (read at build)


def test_pretrained_and_weights_together_refused():
    with pytest.raises(ConfigError, match=r"model.weights=w.pt: model.pretrained=true already sets"):
        check(zoo_cfg("torchvision", pretrained=True, weights="w.pt"))


def test_arch_on_a_builtin_model_refused():
    with pytest.raises(ConfigError, match=r"model.arch=resnet18: applies to model=torchvision/timm"):
        check(structured(ModelConfig, name="cnn", arch="resnet18"))


def test_timm_missing_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model=timm: timm is not installed; pip install 'trainrun\[timm\]'"):
        check(zoo_cfg("timm"))
