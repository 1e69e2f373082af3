"""mode=export (trainrun/modes/export.py): each format checked against the eager model, LoRA merged, refusal."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trainrun
from conftest import FAST, run_cli
from test_inference import digits_run, mode, raw_digits, trained  # noqa: F401  (the shared run)
from trainrun import checkpoint


def _export(run_dir: Path, tmp_path: Path, fmt: str, *overrides):
    path = tmp_path / f"model.{ {'safetensors': 'safetensors', 'onnx': 'onnx', 'torch_export': 'pt2'}[fmt] }"
    result = mode("export", run_dir, tmp_path / "e", f"export.format={fmt}", f"export.path={path}", *overrides)
    return result, path


def _test_inputs(run_dir: Path):
    loaded = trainrun.load(run_dir)
    x, _ = raw_digits("test", loaded.meta["config"]["resolved"]["data"])
    return loaded, loaded.preprocess(x[:37])  # a batch size the export never saw


def _cnn_from_safetensors(path: Path, loaded) -> torch.nn.Module:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from trainrun.models import build_model

    stored = loaded.meta["config"]["resolved"]
    model = build_model(OmegaConf.create(stored["model"]), (1, 8, 8), 10, 0.0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def test_safetensors_export_holds_the_served_weights_and_names_its_source(digits_run, tmp_path):
    result, path = _export(digits_run, tmp_path, "safetensors")
    assert result["parity_max_abs_diff"] <= 1e-4 and path.is_file()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ckpt = checkpoint.list_checkpoints(digits_run)[-1]
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["step"] == "20"
    assert meta["sha256"] == checkpoint.read_meta(ckpt)["sha256"] and len(meta["config_sha256"]) == 64
    assert json.loads(meta["class_names"]) == [str(k) for k in range(10)]
    loaded, x = _test_inputs(digits_run)
    with torch.no_grad():
        assert torch.allclose(_cnn_from_safetensors(path, loaded)(x), loaded.outputs(x, preprocessed=True), atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_with_any_batch_size(digits_run, tmp_path):
    import onnxruntime as ort

    result, path = _export(digits_run, tmp_path, "onnx")
    assert 0 <= result["parity_max_abs_diff"] <= 1e-4
    loaded, x = _test_inputs(digits_run)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == (37, 10) and torch.allclose(got, loaded.outputs(x, preprocessed=True), atol=1e-4)


def test_torch_export_program_reloads_and_matches(digits_run, tmp_path):
    result, path = _export(digits_run, tmp_path, "torch_export")
    assert result["parity_max_abs_diff"] <= 1e-4 and path.suffix == ".pt2"
    loaded, x = _test_inputs(digits_run)
    program = torch.export.load(str(path))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), loaded.outputs(x, preprocessed=True), atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return trained(tmp_path_factory, "digits_cnn_lora", ["model=cnn", "finetune=lora", "finetune.lora_rank=4",
                                                        "trainer.max_steps=8", "trainer.eval_every=8",
                                                        "trainer.ckpt_every=8", "optimizer.lr=0.01"])


def test_a_lora_run_exports_its_adapters_merged_into_the_base_weights(lora_run, tmp_path):
    state, _ = checkpoint.load(checkpoint.list_checkpoints(lora_run)[-1])
    assert any(".lora_A." in k for k in state["model"])
    result, path = _export(lora_run, tmp_path, "safetensors")
    assert result["parity_max_abs_diff"] <= 1e-4
    from safetensors.torch import load_file

    merged = load_file(str(path))
    assert not any("lora" in k or "base_layer" in k for k in merged)
    bases = {k.replace(".base_layer", ""): v for k, v in state["model"].items() if ".base_layer." in k}
    assert bases and all(k in merged for k in bases)
    assert any(not torch.equal(merged[k], v) for k, v in bases.items())  # the trained adapters moved the weights
    loaded = trainrun.load(lora_run)  # load() merges too: the same model as the export
    assert not any("lora" in k for k in loaded.model.state_dict())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(_cnn_from_safetensors(path, loaded)(x), loaded.model(x), atol=1e-6)
    _, onnx_path = _export(lora_run, tmp_path, "onnx")
    assert onnx_path.is_file()


def test_an_export_above_the_parity_bound_is_refused_and_not_written(digits_run, tmp_path):
    target = tmp_path / "strict.onnx"  # onnxruntime's kernels differ from eager by ~1e-7: above atol=0
    p = run_cli(tmp_path, "mode=export", f"resume={digits_run}", "export.format=onnx", f"export.path={target}",
                "export.atol=0", *FAST, check=False)
    lines = [line for line in p.stderr.splitlines() if line.startswith("trainrun: error:")]
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-2000:]
    assert "export.atol=0" in lines[0] and "max abs" in lines[0] and "nothing was written" in lines[0]
    assert not target.exists() and not list(tmp_path.glob(".strict*"))
