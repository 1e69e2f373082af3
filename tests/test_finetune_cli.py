"""Fine-tuning through the CLI (issue 14): starting weights, freezing, gradual unfreezing, layer-wise LR decay and
LoRA as a user types them; exact resume across an unfreeze and with LoRA; the one-line errors."""
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, sha_of
from trainrun import load as trainrun_load

SMALL = ["data.limit_train=320", "data.batch_size=32", *FAST]  # 10 steps per epoch on the real digits


@pytest.fixture(scope="session")
def source_run(tmp_path_factory):
    """A small CNN trained on digits for 20 steps: the starting weights the fine-tuning runs load."""
    cwd = tmp_path_factory.mktemp("source")
    run_cli(cwd, "run_name=src", "trainer.max_steps=20", *SMALL)
    return cwd / "runs" / "src"


def _state(run_dir: Path, step: int):
    return torch.load(run_dir / "checkpoints" / f"step_{step:09d}" / "state.pt", weights_only=True)


def _meta(run_dir: Path, step: int):
    return json.loads((run_dir / "checkpoints" / f"step_{step:09d}" / "meta.json").read_text())


def test_linear_probe_trains_only_the_head_and_keeps_batchnorm_statistics(tmp_path, source_run):
    p = run_cli(tmp_path, "run_name=lp", f"model.weights={source_run}", "finetune=linear_probe",
                "trainer.max_steps=10", "optimizer.lr=0.01", *SMALL)
    assert "finetune: linear_probe: 650 of 65,834 params train" in p.stdout
    assert "650 of 65,834 params train: frozen ones have no gradients or optimizer state" in p.stdout
    src = _state(source_run, 20)["model"]
    out = _state(tmp_path / "runs" / "lp", 10)
    head = {"15.weight", "15.bias"}
    for name, tensor in out["model"].items():  # the backbone (weights and BatchNorm running stats) did not move
        assert torch.equal(tensor, src[name]) == (name not in head), name
    assert len(out["optimizer"]["state"]) == 2  # optimizer state for the head's two tensors only
    weights = _meta(tmp_path / "runs" / "lp", 10)["weights"]
    digest = (source_run / "checkpoints" / "step_000000020" / "state.pt.sha256").read_text().split()[0]
    assert weights["sha256"] == digest and not weights["missing"] and not weights["mismatched"]


def test_resume_across_an_unfreeze_is_bitwise_equal(tmp_path, source_run):
    args = [f"model.weights={source_run}", "finetune=gradual", "finetune.unfreeze_unit=step",
            "finetune.unfreeze_at={*:6}", "trainer.max_steps=10", "trainer.ckpt_every=2", "checkpoint.keep_last=10",
            *SMALL]
    run_cli(tmp_path, "run_name=whole", *args)
    run_cli(tmp_path, "run_name=parts", "trainer.stop_at_step=4", *args)  # before the unfreeze
    p = run_cli(tmp_path, "resume=runs/parts", "trainer.stop_at_step=8", *FAST)  # across it, stopped after it
    assert "unfreeze" in (tmp_path / "runs" / "parts" / "trainrun.log").read_text()
    run_cli(tmp_path, "resume=runs/parts", *FAST)  # resumed with the new optimizer groups
    assert sha_of(tmp_path / "runs" / "whole", 10) == sha_of(tmp_path / "runs" / "parts", 10)
    groups = _state(tmp_path / "runs" / "whole", 10)["optimizer"]["param_groups"]
    assert len(groups) > 2 and any("unfrozen@6" in g["name"] for g in groups)
    assert len(_state(tmp_path / "runs" / "whole", 4)["optimizer"]["param_groups"]) < len(groups)


def test_lora_trains_adapters_resumes_bitwise_and_exports_merged_weights(tmp_path, source_run):
    args = [f"model.weights={source_run}", "finetune=lora", "finetune.lora_rank=4", "trainer.max_steps=10",
            "trainer.ckpt_every=5", *SMALL]
    p = run_cli(tmp_path, "run_name=whole", *args)
    assert "LoRA adapters" in p.stdout
    run_cli(tmp_path, "run_name=parts", "trainer.stop_at_step=5", *args)
    run_cli(tmp_path, "resume=runs/parts", *FAST)
    assert sha_of(tmp_path / "runs" / "whole", 10) == sha_of(tmp_path / "runs" / "parts", 10)
    state = _state(tmp_path / "runs" / "whole", 10)["model"]
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    src = _state(source_run, 20)["model"]
    assert torch.equal(state["0.base_layer.weight"], src["0.weight"])  # the base stays frozen
    run_cli(tmp_path, "mode=eval", "resume=runs/whole", *FAST)  # eval rebuilds the adapters it evaluates
    evaluated = json.loads(next((tmp_path / "runs" / "whole" / "eval").glob("*/eval.json")).read_text())
    assert evaluated["val/acc"] == _meta(tmp_path / "runs" / "whole", 10)["metrics"]["val/acc"]
    # the merged export is a plain CNN's weights: they load strictly (nothing missing or unexpected) into the model
    # trainrun builds for this data, which then gives the LoRA model's outputs
    from omegaconf import OmegaConf

    from trainrun.config import ModelConfig
    from trainrun.models import build_model
    from trainrun.models.weights import load_initial_weights

    merged = tmp_path / "runs" / "whole" / "merged.safetensors"
    plain = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "cnn"}), (1, 8, 8), 10, 0.0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "cnn", "weights": str(merged),
                                                               "weights_strict": True})
    report = load_initial_weights(plain, cfg, 1)
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    loaded = trainrun_load(tmp_path / "runs" / "whole")  # the LoRA model, adapters merged by trainrun.load
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), loaded.model(x), atol=1e-5)


def test_layer_decay_scales_each_layers_lr(tmp_path):
    run_cli(tmp_path, "run_name=ld", "finetune=layer_decay", "finetune.layer_decay=0.5", "trainer.max_steps=2",
            *SMALL)
    groups = _state(tmp_path / "runs" / "ld", 2)["optimizer"]["param_groups"]
    scales = {g["lr_layer"]: g["lr_scale"] for g in groups}
    assert scales == {4: 1.0, 3: 0.5, 2: 0.25, 1: 0.125, 0: 0.0625}  # 4 conv(+BN) layers and the head


def test_head_lr_gives_the_head_its_own_learning_rate(tmp_path):
    run_cli(tmp_path, "run_name=hl", "finetune.head_lr=0.01", "optimizer.lr=0.001", "trainer.max_steps=2",
            "schedule=constant", *SMALL)
    groups = _state(tmp_path / "runs" / "hl", 2)["optimizer"]["param_groups"]
    lrs = {g.get("lr_layer"): g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(0.01) and lrs[None] == pytest.approx(0.001)


@pytest.mark.parametrize("args, needle", [
    (["model=torchvision", "model.arch=resnet1"], "model.arch"),
    (["model.weights=nowhere.pt"], "nowhere.pt"),
    (["finetune.freeze=[nosuchlayer.*]"], "nosuchlayer"),
    (["model.weights=x.pt", "init=kaiming_normal"], "init"),
])
def test_bad_finetune_input_is_one_line(tmp_path, args, needle):
    p = run_cli(tmp_path, *args, "trainer.max_steps=1", *SMALL, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainrun: error:") and needle in lines[0], p.stderr
    assert not any(path.is_file() for path in tmp_path.rglob("*")), "a refused command wrote a file"


def test_weights_that_fit_nothing_are_refused(tmp_path):
    torch.save({"encoder.w": torch.zeros(3, 3)}, tmp_path / "other.pt")
    p = run_cli(tmp_path, "model.weights=other.pt", "trainer.max_steps=1", *SMALL, check=False)
    assert p.returncode == 2 and "fits nothing" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_pretrained_torchvision_weights_load_from_the_cache(tmp_path, monkeypatch):
    """model.pretrained=true reads the file torchvision's DEFAULT weights name from TORCH_HOME (placed here: no
    download); its SHA256 and source land in meta.json, the 1000-class head is replaced for the 10 digits."""
    import hashlib

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    args = ["model=torchvision", "model.arch=resnet18", "model.pretrained=true", "model.small_input=true",
            "trainer.max_steps=1", "data.limit_train=32", "data.batch_size=16", *FAST]
    p = run_cli(tmp_path, "run_name=tv", *args)
    assert "head replaced" in p.stdout
    weights = _meta(tmp_path / "runs" / "tv", 1)["weights"]
    assert weights["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert "resnet18" in weights["source"] and weights["head"] == ["fc.weight", "fc.bias"]
    cached.unlink()
    p = run_cli(tmp_path, "run_name=tv2", *args, check=False)
    assert p.returncode == 2 and str(cached) in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_a_checkpoint_from_before_finetune_resumes_and_a_changed_parameter_set_is_refused():
    from omegaconf import OmegaConf

    from trainrun.config import TrainrunConfig
    from trainrun.errors import ConfigError
    from trainrun.resume import check_resume_compatible

    new = OmegaConf.to_container(OmegaConf.structured(TrainrunConfig))
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in new.items() if k != "finetune"}
    for key in ("arch", "pretrained", "weights", "weights_strict"):  # keys newer than the checkpoint
        old["model"].pop(key)
    assert check_resume_compatible(old, new) == []
    new["finetune"]["freeze"] = ["*"]
    with pytest.raises(ConfigError, match=r"finetune.freeze changed from \[\] to \['\*'\]"):
        check_resume_compatible(old, new)


def test_timm_model_with_pretrained_weights_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """model=timm through the CLI: the pretrained file is found in the Hugging Face cache layout (offline)."""
    from test_weights import fake_hf_cache

    args = ["model=timm", "model.arch=resnet18", "model.pretrained=true", "trainer.max_steps=1",
            "data.limit_train=32", "data.batch_size=16", *FAST]
    path, _ = fake_hf_cache(tmp_path, monkeypatch)  # the missing file's one line: tests/test_weights.py
    run_cli(tmp_path, "run_name=timm", *args)
    weights = _meta(tmp_path / "runs" / "timm", 1)["weights"]
    assert weights["source"] == "timm:resnet18.a1_in1k" and weights["file"] == str(path)
