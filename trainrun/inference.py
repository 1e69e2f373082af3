"""Inference from a trained run: `trainrun.load(RUN or checkpoint)` -> a `Loaded` model ready to predict.

The checkpoint is SHA256-verified and unpickled weights_only (trainrun.checkpoint.load). The model is rebuilt from
the checkpoint's stored config (its model section; input shape and outputs from meta.json "io"), with the LoRA
adapters of a LoRA run injected, loaded and merged into the base weights, and the EMA weights when the checkpoint
has them (what its val/* metrics were measured on). The stored config is data read from disk: a user model
(`model._target_`) is imported only when the caller passes trust_code=True (the resume trust rule of
trainrun/runner.py check_stored_code).

mode=predict and mode=export share `inference_module` (the weights to serve, LoRA merged) and `interpret` (labels
and probabilities from the model's outputs).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from trainrun import checkpoint
from trainrun.errors import CheckpointError, ConfigError

WEIGHTS = ("auto", "model", "ema")
SIGMOID_TASKS = ("binary", "multilabel")


# ------------------------------------------------------------------------------------------- shared with the modes

def inference_module(model: nn.Module, state: Dict[str, Any], weights: str = "auto", lora: bool = False,
                     where: str = "the checkpoint") -> Tuple[nn.Module, str]:
    """(a copy of `model` holding the checkpoint's weights, which: "ema" | "model"): `ema`: its EMA weights; `auto`:
    EMA when it has them; LoRA adapters merged when `lora`; in eval mode. `model` itself is left as it was."""
    _check_weights(weights)
    if weights == "ema" and "ema" not in state:
        raise ConfigError(f"weights='ema': {where} holds no EMA weights (the run had regularization.ema_decay=0); "
                          "use weights='auto' or 'model'")
    use_ema = "ema" in state and weights != "model"
    module = copy.deepcopy(model)
    try:
        module.load_state_dict(state["ema"]["module"] if use_ema else state["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where} does not fit the model rebuilt from its config ({why}); load another "
                              "checkpoint") from e
    if lora:
        from trainrun.finetune import merge_lora

        merge_lora(module)
    return module.eval(), "ema" if use_ema else "model"


def _check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}: use one of {', '.join(WEIGHTS)} (auto: EMA when the checkpoint "
                          "has it)")


def interpret(outputs: torch.Tensor, task: str, threshold: float = 0.5
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(labels, probabilities) from a batch of model outputs: classification: argmax and softmax; binary: sigmoid
    [N] and sigmoid > threshold; multilabel: sigmoid [N, L] and the 0/1 matrix; other tasks: (None, None)."""
    out = outputs.detach().float()
    if task == "classification":
        probs = out.softmax(-1)
        return probs.argmax(-1), probs
    if task in SIGMOID_TASKS:
        probs = out.sigmoid().reshape(len(out), -1)
        probs = probs[:, 0] if task == "binary" else probs
        return (probs > threshold).long(), probs
    return None, None


# ------------------------------------------------------------------------------------------------- preprocessing

class Preprocess:
    """Raw inputs -> what the model was trained on, from meta.json "io".preprocess (see trainrun.data.datasets.Split):
    {"scale", "resize", "mean", "std"}: a tensor / array [N, C, H, W] or [C, H, W] of raw values (digits: 0..16);
    {"image_size", "short_side", "mean", "std"}: PIL images or image file paths (one or a list);
    {}: the inputs as they are (user data prepares its own samples)."""

    def __init__(self, spec: Dict[str, Any], input_shape: Sequence[int]):
        self.spec, self.input_shape = dict(spec or {}), tuple(input_shape)

    def __call__(self, x: Any) -> torch.Tensor:
        if "image_size" in self.spec:
            return self._images(x)
        t = torch.as_tensor(x, dtype=torch.float32)
        if self.input_shape[0] == 1 and t.ndim == len(self.input_shape):
            t = t.unsqueeze(1)  # single-channel images given as [N, H, W] (load_digits().images), or one [1, H, W]
        elif t.ndim == len(self.input_shape):
            t = t.unsqueeze(0)
        elif t.ndim == len(self.input_shape) - 1 and self.input_shape[0] == 1:
            t = t.unsqueeze(0).unsqueeze(0)  # one single-channel image [H, W]
        if "scale" in self.spec:
            t = self._tensor(t)
        if tuple(t.shape[1:]) != self.input_shape:
            raise ConfigError(f"input of shape {tuple(t.shape)} after preprocessing; the model takes [N, "
                              f"{', '.join(map(str, self.input_shape))}]: pass raw samples of the training data's "
                              "shape")
        return t.contiguous()

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        from trainrun.data.datasets import _resize

        s = self.spec
        t = t * float(s.get("scale") or 1.0)
        if s.get("resize"):
            t = _resize(t, int(s["resize"]))
        return (t - float(s.get("mean", 0.0))) / float(s.get("std", 1.0))

    def _images(self, x: Any) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        items = x if isinstance(x, (list, tuple)) else [x]
        s, out = self.spec, []
        for item in items:
            img = Image.open(item).convert("RGB") if isinstance(item, (str, Path)) else item
            t = F.to_dtype(F.to_image(img), torch.float32, scale=True)
            size, mode = int(s["image_size"]), InterpolationMode(s.get("interpolation", "bilinear"))
            if s.get("short_side"):
                t = F.center_crop(F.resize(t, int(s["short_side"]), mode, antialias=True), [size, size])
            elif tuple(t.shape[-2:]) != (size, size):
                t = F.resize(t, [size, size], mode, antialias=True)
            out.append(F.normalize(t, list(s["mean"]), list(s["std"])))
        return torch.stack(out)


# ----------------------------------------------------------------------------------------------------- load()

class Loaded:
    """A trained model ready for inference. `model`: eval mode, on `device`; `preprocess(raw)` -> model inputs;
    `outputs(x)`: the model's raw outputs; `predict(x)` -> (labels, probabilities) for classification tasks."""

    def __init__(self, model: nn.Module, meta: Dict[str, Any], ckpt_dir: Path, device: torch.device, weights: str):
        io = meta["io"]
        self.model, self.meta, self.checkpoint, self.device = model, meta, Path(ckpt_dir), device
        self.task: str = io.get("task") or "classification"
        self.class_names: Optional[List[str]] = io.get("class_names")
        self.preprocess = Preprocess(io.get("preprocess") or {}, io["input_shape"])
        task_cfg = meta["config"]["resolved"].get("task") or {}
        self.threshold = float(task_cfg.get("threshold", 0.5))
        self.user_task = bool(task_cfg.get("_target_"))
        self.weights = weights  # "ema" | "model": which weights the model holds

    @torch.no_grad()
    def outputs(self, x: Any, preprocessed: bool = False, batch_size: int = 256) -> torch.Tensor:
        x = x if preprocessed else self.preprocess(x)
        x = torch.as_tensor(x, dtype=torch.float32)
        return torch.cat([self.model(x[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)

    def predict(self, x: Any, preprocessed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(labels, probabilities) for raw inputs `x` (model inputs with preprocessed=True)."""
        if self.user_task or self.task not in ("classification", *SIGMOID_TASKS):
            raise ConfigError(f"predict: task={self.task}{' (a user task._target_)' if self.user_task else ''} has "
                              "no labels or probabilities; use .outputs(x) for the model's outputs")
        return interpret(self.outputs(x, preprocessed), self.task, self.threshold)

    def __repr__(self) -> str:
        return (f"Loaded({self.checkpoint}, step {self.meta.get('step')}, task={self.task}, weights={self.weights}, "
                f"device={self.device})")


def load(run_or_checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu", weights: str = "auto",
         trust_code: bool = False) -> Loaded:
    """A run directory (its newest complete checkpoint, as mode=eval/predict/export pick), a checkpoint directory
    (RUN/checkpoints/step_N), or a pointer file (RUN/checkpoints/best, .../latest) -> `Loaded`.
    `weights`: auto (EMA when the checkpoint has it) | model | ema. `trust_code`: allow importing the user model
    (`model._target_`) the checkpoint's stored config names."""
    _check_weights(weights)
    ckpt_dir = _checkpoint_dir(Path(run_or_checkpoint))
    state, meta = checkpoint.load(ckpt_dir, map_location="cpu")
    if not isinstance(meta.get("io"), dict):
        raise CheckpointError(f"checkpoint {ckpt_dir} predates trainrun.load: its meta.json has no \"io\" section "
                              "(input shape, classes, preprocessing); use mode=predict or mode=export resume=RUN, "
                              "which rebuild them from the data, or save a checkpoint with this trainrun")
    stored = meta["config"]["resolved"]
    _check_trusted(stored, trust_code)
    model, lora = _rebuild_model(stored, meta["io"])
    dev = torch.device(device)
    module, used = inference_module(model, state, weights, lora, where=f"checkpoint {ckpt_dir}")
    return Loaded(module.to(dev), meta, ckpt_dir, dev, used)


def _checkpoint_dir(path: Path) -> Path:
    if path.is_file() and path.parent.name == "checkpoints":  # a pointer: best / latest
        target = checkpoint.read_pointer(path.parent.parent, path.name)
        if target is None:
            raise CheckpointError(f"{path} does not name a complete checkpoint of its run; pass the run directory "
                                  "or RUN/checkpoints/step_N")
        return target
    return checkpoint.candidates(str(path), Path("runs"), key="trainrun.load")[0]


def _check_trusted(stored: Dict[str, Any], trust_code: bool) -> None:
    from trainrun import usercode

    targets = usercode.config_targets({"model": stored.get("model") or {}})
    if targets and not trust_code:
        path, target = next(iter(targets.items()))
        raise ConfigError(f"trainrun.load refused: the checkpoint's config names {path}._target_={target}; trainrun "
                          "never imports code only a stored config names: pass trust_code=True if you trust it")


def _vocabulary(io: Dict[str, Any]) -> Optional[int]:
    """A language model's vocabulary (the model's outputs per position), checked: meta.json is untrusted input."""
    vocab = io.get("vocab_size")
    if vocab is None:
        return None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 2 <= vocab <= 2 ** 20:
        raise CheckpointError(f"meta.json io.vocab_size={vocab!r} is not a vocabulary size (an integer in [2, "
                              "2**20]); the checkpoint's meta.json was altered: use another checkpoint")
    return vocab


def _rebuild_model(stored: Dict[str, Any], io: Dict[str, Any]) -> Tuple[nn.Module, bool]:
    """The stored model section built for the stored input shape and outputs, with the run's LoRA adapters."""
    from omegaconf import OmegaConf

    from trainrun.models import build_model

    model_cfg = OmegaConf.create(stored["model"])
    dropout = (stored.get("regularization") or {}).get("dropout")  # as trainrun.regularization.effective_dropout
    dropout = model_cfg.get("dropout", 0.0) if dropout is None else dropout
    classes = _vocabulary(io) or (io["num_classes"] if io.get("num_classes") is not None else io["num_outputs"])
    model = build_model(model_cfg, tuple(io["input_shape"]), int(classes), float(dropout or 0.0),
                        num_outputs=io.get("num_outputs"))
    ft = stored.get("finetune") or {}
    lora = int(ft.get("lora_rank") or 0) > 0
    if lora:
        from trainrun.finetune import Finetuner

        Finetuner(OmegaConf.create(ft), model, 1).prepare()
    return model, lora
