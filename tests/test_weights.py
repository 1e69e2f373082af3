"""Starting weights: the zoos' pretrained files found where their caches keep them (written here: this machine cannot
download), model.weights=PATH in its three forms, the mismatch report, strict refusal and the one-line errors."""
import hashlib
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from trainrun import checkpoint
from trainrun.config import ModelConfig
from trainrun.errors import ConfigError
from trainrun.models import build_model
from trainrun.models.weights import load_initial_weights

from conftest import structured


def zoo_cfg(zoo, **values):
    values = {"arch": "resnet18", "small_input": False, **values}
    return structured(ModelConfig, name=zoo, **values)


def imagenet_resnet18(zoo):
    """A random resnet18 as the zoo publishes it: 3 channels, 1000 classes."""
    torch.manual_seed(0)
    return build_model(zoo_cfg(zoo), (3, 224, 224), 1000, 0.0).state_dict()


def digits_model(zoo, **values):
    torch.manual_seed(1)
    return build_model(zoo_cfg(zoo, **values), (1, 28, 28), 10, 0.0)


def check_backbone_from(model, source_sd):
    """Every backbone tensor equals the file's (the stem's summed over RGB); the head is not the file's."""
    own = model.state_dict()
    assert torch.allclose(own["conv1.weight"], source_sd["conv1.weight"].sum(dim=1, keepdim=True))
    for name in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(own[name], source_sd[name])
    assert own["fc.weight"].shape == (10, 512)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ torchvision
def torchvision_cache_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    return tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)


def test_torchvision_pretrained_from_the_cache(tmp_path, monkeypatch, caplog):
    path = torchvision_cache_file(tmp_path, monkeypatch)
    path.parent.mkdir(parents=True)
    source_sd = imagenet_resnet18("torchvision")
    torch.save(source_sd, path)
    model = digits_model("torchvision")
    with caplog.at_level(logging.INFO, logger="trainrun"):
        info = load_initial_weights(model, zoo_cfg("torchvision", pretrained=True), 1)
    check_backbone_from(model, source_sd)
    assert info["source"] == "torchvision:resnet18:IMAGENET1K_V1" and info["file"] == str(path)
    assert info["sha256"] == sha(path)
    assert info["head"] == ["fc.weight", "fc.bias"]
    assert info["missing"] == info["unexpected"] == info["mismatched"] == []
    assert "expected: the head was replaced for 10 classes" in caplog.text
    assert "not the file the zoo published" in caplog.text  # random weights: not torchvision's SHA256 prefix


def test_torchvision_missing_cached_file_is_one_line(tmp_path, monkeypatch):
    path = torchvision_cache_file(tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as e:
        load_initial_weights(digits_model("torchvision"), zoo_cfg("torchvision", pretrained=True), 1)
    message = str(e.value)
    assert f"no cached weights file {path} " in message and "\n" not in message
    assert "get_model_weights('resnet18').DEFAULT.get_state_dict()" in message and f"to {path}" in message


# ------------------------------------------------------------------------------------------------------- timm
def fake_hf_cache(tmp_path, monkeypatch, with_file=True):
    """The Hugging Face cache layout hf_hub_download leaves: snapshots/<revision>/FILE and refs/main."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / "model.safetensors"
    path.parent.mkdir(parents=True)
    if with_file:
        source_sd = imagenet_resnet18("timm")
        save_file(source_sd, str(path))
        return path, source_sd
    return path, None


def test_timm_pretrained_from_the_hf_cache(tmp_path, monkeypatch):
    path, source_sd = fake_hf_cache(tmp_path, monkeypatch)
    model = digits_model("timm")
    info = load_initial_weights(model, zoo_cfg("timm", pretrained=True), 1)
    check_backbone_from(model, source_sd)
    assert info["source"] == "timm:resnet18.a1_in1k" and info["file"] == str(path) and info["sha256"] == sha(path)
    assert info["head"] == ["fc.weight", "fc.bias"] and info["mismatched"] == []


def test_timm_missing_cached_file_is_one_line(tmp_path, monkeypatch):
    fake_hf_cache(tmp_path, monkeypatch, with_file=False)
    with pytest.raises(ConfigError) as e:
        load_initial_weights(digits_model("timm"), zoo_cfg("timm", pretrained=True), 1)
    message = str(e.value)
    assert f"no cached weights file {tmp_path}/hf/hub/models--timm--resnet18.a1_in1k/snapshots/<revision>/" \
           "model.safetensors" in message and "\n" not in message
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in message


def test_small_input_stem_is_reported_mismatched(tmp_path, monkeypatch):
    path, source_sd = fake_hf_cache(tmp_path, monkeypatch)
    model = digits_model("timm", small_input=True)
    info = load_initial_weights(model, zoo_cfg("timm", small_input=True, pretrained=True), 1)
    assert info["mismatched"] == ["conv1.weight [64, 3, 7, 7]->[64, 1, 3, 3]"]
    with pytest.raises(ConfigError, match=r"model.weights_strict=true: .* shape conv1.weight"):
        load_initial_weights(model, zoo_cfg("timm", small_input=True, pretrained=True, weights_strict=True), 1)


# ---------------------------------------------------------------------------------------------- model.weights
def own_weights(tmp_path):
    """A cnn's state_dict, as a compiled-and-wrapped model would save it (prefixes stripped on load)."""
    torch.manual_seed(2)
    source = build_model(structured(ModelConfig, name="cnn"), (1, 8, 8), 10, 0.0)
    return source.state_dict()


def fresh_cnn():
    torch.manual_seed(3)
    return build_model(structured(ModelConfig, name="cnn"), (1, 8, 8), 10, 0.0)


def assert_same(model, sd):
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())


@pytest.mark.parametrize("form", ["pt", "wrapped", "prefixed", "safetensors"])
def test_weights_file_forms(tmp_path, form):
    sd = own_weights(tmp_path)
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        save_file(sd, str(path))
    else:
        obj = {"state_dict": sd, "epoch": 3} if form == "wrapped" else \
            {f"module._orig_mod.{k}": v for k, v in sd.items()} if form == "prefixed" else sd
        torch.save(obj, path)
    model = fresh_cnn()
    info = load_initial_weights(model, structured(ModelConfig, name="cnn", weights=str(path)), 1)
    assert_same(model, sd)
    assert info["source"] == str(path) and info["sha256"] == sha(path)
    assert info["missing"] == info["unexpected"] == info["mismatched"] == info["head"] == []


def save_trainrun_checkpoint(tmp_path, sd):
    run = tmp_path / "run"
    checkpoint.save(run, 5, {"model": sd, "optimizer": {}}, {"model": {"name": "cnn"}}, keep_last=2)
    return run


def test_trainrun_run_dir_and_checkpoint_dir(tmp_path):
    sd = own_weights(tmp_path)
    run = save_trainrun_checkpoint(tmp_path, sd)
    ckpt = run / "checkpoints" / "step_000000005"
    for spec in (run, ckpt):
        model = fresh_cnn()
        info = load_initial_weights(model, structured(ModelConfig, name="cnn", weights=str(spec)), 1)
        assert_same(model, sd)
        assert info["file"] == str(ckpt / "state.pt") and info["sha256"] == sha(ckpt / "state.pt")


def test_tampered_checkpoint_refused(tmp_path):
    run = save_trainrun_checkpoint(tmp_path, own_weights(tmp_path))
    state = run / "checkpoints" / "step_000000005" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"model.weights={run}: checkpoint .* failed its SHA256 check"):
        load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn", weights=str(run)), 1)


def test_head_replaced_and_strict(tmp_path):
    """Weights of a 4-class cnn into a 10-class one: the head is expected; an extra key is only refused when
    strict."""
    torch.manual_seed(2)
    sd = build_model(structured(ModelConfig, name="cnn"), (1, 8, 8), 4, 0.0).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    model = fresh_cnn()
    info = load_initial_weights(model, structured(ModelConfig, name="cnn", weights=str(path)), 1)
    head = [k for k in sd if k.startswith(info["head"][0].rsplit(".", 1)[0] + ".")]
    assert sorted(info["head"]) == sorted(head) and info["unexpected"] == ["extra.weight"]
    assert_same(model, {k: v for k, v in sd.items() if k not in head and k != "extra.weight"})
    with pytest.raises(ConfigError, match=r"weights_strict=true: .* unexpected extra.weight \(1 in all\)"):
        load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn", weights=str(path),
                                                     weights_strict=True), 1)


def test_file_that_fits_nothing(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ConfigError, match=r"the file fits nothing in this model: its names look like "
                                          r"encoder.layer.0.weight vs the model's"):
        load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn", weights=str(path)), 1)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=rf"^model.weights={tmp_path}: no checkpoint there; pass a run directory"):
        load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn", weights=str(tmp_path)), 1)


@pytest.mark.parametrize("content,why", [(None, "no such file or directory"),
                                         (b"not a pickle", "cannot read"),
                                         ("list", "holds a list, not a mapping of names to weight tensors")])
def test_unreadable_weights_are_one_line(tmp_path, content, why):
    path = tmp_path / "w.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn", weights=str(path)), 1)
    assert str(e.value).startswith(f"model.weights={path}: ") and why in str(e.value) and "\n" not in str(e.value)


def test_no_starting_weights():
    assert load_initial_weights(fresh_cnn(), structured(ModelConfig, name="cnn"), 1) is None
