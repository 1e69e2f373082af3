"""mode=export: the checkpoint's model as a deployable artifact, checked against the eager model before it is kept.

export.format = safetensors (the weights, with metadata naming the source checkpoint, its SHA256, step and config
hash) | onnx (torch.onnx.export dynamo=True, dynamic batch dimension) | torch_export (torch.export, saved .pt2).
The weights are the checkpoint's EMA weights when it has them, LoRA merged into the base layers. Every export is
run back (onnxruntime / the reloaded ExportedProgram / a fresh model loaded from the safetensors) on a real batch of
the validation data; the largest absolute difference from the eager model is printed, and an export above
export.atol is refused (deleted, exit 1). Default path: model.<ext> in this mode's directory (RUN/export/<time>).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

from trainrun.errors import ConfigError, TrainrunError
from trainrun.inference import inference_module
from trainrun.logging import console

EXTENSIONS = {"safetensors": "safetensors", "onnx": "onnx", "torch_export": "pt2"}
PARITY_BATCH = 64  # samples of the val split the parity check runs


class ParityError(TrainrunError):
    """The export does not compute what the eager model computes: a failed check (exit 1), not a config error."""
    exit_code = 1


def export_mode(run, t0: float) -> Dict[str, Any]:
    cfg = run.cfg.export
    if cfg.format not in EXTENSIONS:
        raise ConfigError(f"export.format={cfg.format}: use one of {', '.join(EXTENSIONS)}")
    path = Path(cfg.path) if cfg.path else run.dir / f"model.{EXTENSIONS[cfg.format]}"
    if path.is_dir():
        raise ConfigError(f"export.path={cfg.path} is a directory; name a file, e.g. {path / path.name}")
    lora = run.finetuner is not None and run.cfg.finetune.lora_rank > 0
    model, weights = inference_module(run.model, run.resumed.state, "auto", lora, where=f"checkpoint {run.resumed.dir}")
    model = model.float().cpu()
    batch = _parity_batch(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # torch.export.load wants .pt2
    try:
        reload = EXPORTERS[cfg.format](run, model, batch, tmp)
        diff = _max_abs_diff(model, reload, batch)
        if not diff <= cfg.atol:  # NaN fails too
            raise ParityError(f"export.format={cfg.format}: the export differs from the eager model by {diff:.3g} "
                              f"(max abs) on {len(batch)} val samples, above export.atol={cfg.atol:g}; nothing was "
                              "written: raise export.atol if that is expected, or try another export.format")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if run.info.is_main:
        console().print(f"export of {run.resumed.dir} (step {run.resumed.meta['step']}, {weights} weights"
                        f"{', LoRA merged' if lora else ''}): {path} ({cfg.format}, {path.stat().st_size:,} bytes); "
                        f"parity on {len(batch)} val samples: max abs diff {diff:.3g} (atol {cfg.atol:g})",
                        markup=False)
    return {"parity_max_abs_diff": diff, "bytes": path.stat().st_size, "finished": True}


def _parity_batch(run) -> torch.Tensor:
    """The first samples of the validation split, as the model sees them."""
    from trainrun.data import BatchStream

    stream = BatchStream(run.split.val, min(PARITY_BATCH, len(run.split.val)), run.cfg.seed, shuffle=False,
                         drop_last=False)
    x, _, _ = next(iter(stream.iter_epoch(0)))
    return (x if not x.is_floating_point() else x.float()).cpu()  # token ids stay integers


@torch.no_grad()
def _max_abs_diff(model: nn.Module, reload: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
    """Largest |eager - exported| over the batch and over one sample alone (the batch dimension is dynamic)."""
    diff = 0.0
    for x in (batch, batch[:1]):
        expected = model(x).float()
        got = torch.as_tensor(reload(x)).float()
        if got.shape != expected.shape:
            raise ParityError(f"export: the exported model returns shape {tuple(got.shape)} for a batch of {len(x)}, "
                              f"the eager model {tuple(expected.shape)}; the export is not usable")
        diff = max(diff, float((got - expected).abs().max()))
    return diff


def _source_metadata(run) -> Dict[str, str]:
    """Strings identifying where the weights came from (safetensors metadata holds only str -> str)."""
    meta = run.resumed.meta
    stored = meta["config"]["resolved"]
    config_sha = hashlib.sha256(json.dumps(stored, sort_keys=True, default=str).encode()).hexdigest()
    io = meta.get("io") or {}
    return {"format": "trainrun", "checkpoint": str(Path(run.resumed.dir).resolve()), "sha256": str(meta["sha256"]),
            "step": str(meta["step"]), "config_sha256": config_sha,
            "model": json.dumps(stored.get("model"), sort_keys=True, default=str),
            "input_shape": json.dumps(list(run.split.input_shape)),
            "class_names": json.dumps(run.split.class_names or io.get("class_names")),
            "preprocess": json.dumps(getattr(run.split, "preprocess", None) or io.get("preprocess") or {},
                                     default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))}


def _safetensors(run, model: nn.Module, batch: torch.Tensor, path: Path) -> Callable:
    from safetensors.torch import load_model, save_model

    # save_model/load_model store a tied weight (a GPT's head and embedding) once and tie it again on load
    save_model(model, str(path), metadata=_source_metadata(run), force_contiguous=True)
    fresh = _fresh_model(run)
    load_model(fresh, str(path), strict=True)
    return fresh.eval()


def _fresh_model(run) -> nn.Module:
    """The run's model built anew from its config (no LoRA: the export's keys are the base model's)."""
    from trainrun.models import build_model
    from trainrun.regularization import effective_dropout
    from trainrun.tasks import model_classes

    cfg, split = run.cfg, run.split
    classes = model_classes(run.task, split)
    return build_model(cfg.model, split.input_shape, classes, effective_dropout(cfg.regularization, cfg.model),
                       num_outputs=run.task.num_outputs).float()


def _batch_dim(batch: torch.Tensor) -> Tuple[Dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


def _onnx(run, model: nn.Module, batch: torch.Tensor, path: Path) -> Callable:
    import onnxruntime as ort

    program = torch.onnx.export(model, (batch,), dynamo=True, dynamic_shapes=_batch_dim(batch), verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _torch_export(run, model: nn.Module, batch: torch.Tensor, path: Path) -> Callable:
    program = torch.export.export(model, (batch,), dynamic_shapes=_batch_dim(batch))
    with open(path, "wb") as f:
        torch.export.save(program, f)
    loaded = torch.export.load(str(path)).module()
    return loaded


EXPORTERS = {"safetensors": _safetensors, "onnx": _onnx, "torch_export": _torch_export}
