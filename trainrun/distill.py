"""Knowledge distillation: teacher loading (verified checkpoint), response KD (Hinton 2015), feature KD (FitNets).

Loss = (1 - alpha) * task_loss(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
       + feature_weight * sum over hint pairs of MSE(proj(f_s), f_t)
KL uses reduction='batchmean' on log_softmax(z_s / T); the T^2 factor keeps the soft-target gradients on the
same scale as the hard-target ones when T changes. The teacher runs in eval mode, without gradients, under the
same autocast as the student.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from trainrun import checkpoint
from trainrun.errors import ConfigError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch mean, in fp32."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)


def _teacher_model(meta, ckpt_dir: Path, spec: str):
    """The teacher's recorded model config as a typed ModelConfig, its strings literal (never resolved)."""
    from omegaconf.errors import OmegaConfBaseException

    from trainrun.config import ModelConfig
    from trainrun.errors import CheckpointError
    from trainrun.models import MODELS
    from trainrun.resume import literal_config

    resolved = meta.get("config", {}).get("resolved") if isinstance(meta.get("config"), dict) else None
    model = resolved.get("model") if isinstance(resolved, dict) else None
    try:
        if not isinstance(model, dict):
            raise CheckpointError("no config.resolved.model mapping")
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), literal_config(model))
    except (CheckpointError, OmegaConfBaseException) as e:
        raise ConfigError(f"distillation.teacher={spec}: the model config in {ckpt_dir}/{checkpoint.META} is not "
                          f"usable ({str(e).splitlines()[0]}); point distillation.teacher at a trainrun run or "
                          "checkpoint") from e
    if cfg.name not in MODELS:
        raise ConfigError(f"distillation.teacher={spec}: {ckpt_dir}/{checkpoint.META} records model {cfg.name!r}, "
                          f"not one of {', '.join(MODELS)}; point distillation.teacher at a trainrun checkpoint")
    return cfg


def load_teacher(spec: str, input_shape, num_classes: int, weights: str, output_root: str) -> Tuple[nn.Module, Dict]:
    """Build the teacher from a trainrun checkpoint (SHA256-verified, weights_only) and its recorded model config;
    a model too large for this machine is refused from meta.json, before the state is read or anything built."""
    from trainrun.models import build_model, check_model_size

    cands = checkpoint.candidates(spec, Path(output_root), key="distillation.teacher")
    ckpt_dir = cands[0]
    model_cfg = _teacher_model(checkpoint.read_meta(ckpt_dir), ckpt_dir, spec)
    try:
        check_model_size(model_cfg, input_shape, num_classes, what=f"distillation.teacher={spec}")
    except (RuntimeError, ValueError, TypeError) as e:  # sizes no trainrun config holds (negative widths, ...)
        raise ConfigError(f"distillation.teacher={spec}: its recorded model config cannot be built "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point "
                          "distillation.teacher at a trainrun checkpoint") from e
    state, meta = checkpoint.load(ckpt_dir)
    tcfg = {"model": OmegaConf.to_container(model_cfg)}
    teacher = build_model(model_cfg, input_shape, num_classes, 0.0)
    has_ema = isinstance(state, dict) and isinstance(state.get("ema"), dict)
    use_ema = weights == "ema" or (weights == "auto" and has_ema)
    if weights == "ema" and not has_ema:
        raise ConfigError(f"distillation.teacher_weights=ema but teacher checkpoint {ckpt_dir} has no EMA weights; "
                          "use teacher_weights=model")
    sd = (state["ema"].get("module") if use_ema else state.get("model")) if isinstance(state, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ConfigError(f"distillation.teacher={spec}: {ckpt_dir}/{checkpoint.STATE} holds no mapping of weight "
                          "tensors; point distillation.teacher at a trainrun checkpoint")
    try:
        teacher.load_state_dict(sd)
    except RuntimeError as e:
        raise ConfigError(f"distillation.teacher={spec}: its weights do not fit a {tcfg['model']['name']} for this data "
                          f"(input {tuple(input_shape)}, {num_classes} classes): {str(e).splitlines()[0]}") from e
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fingerprint = meta.get("data", {}).get("fingerprint") if isinstance(meta.get("data"), dict) else None
    info = {"checkpoint": str(ckpt_dir), "sha256": meta.get("sha256"), "step": meta.get("step"),
            "weights": "ema" if use_ema else "model", "model": tcfg["model"],
            "data_fingerprint": fingerprint if isinstance(fingerprint, str) else None,
            "recipe_overrides": meta.get("overrides")}
    return teacher, info


def _named(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        sample = ", ".join(n for n in list(modules)[1:12] if n)
        raise ConfigError(f"distillation.feature_pairs: the {role} has no layer named {name!r}; "
                          f"layers look like: {sample}, ...")
    return modules[name]


def _projection(s_shape: torch.Size, t_shape: torch.Size, pair: str) -> nn.Module:
    if len(s_shape) == 4 and len(t_shape) == 4 and s_shape[2:] == t_shape[2:]:
        return nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False)
    if len(s_shape) == 2 and len(t_shape) == 2:
        return nn.Linear(s_shape[1], t_shape[1], bias=False)
    raise ConfigError(f"distillation.feature_pairs {pair!r}: student output {tuple(s_shape[1:])} cannot be projected "
                      f"onto teacher output {tuple(t_shape[1:])}; pair conv maps of the same height and width, or "
                      "two flat feature vectors")


class Distiller(nn.Module):
    """Holds the teacher and the learned hint projections (trained with the student, saved in checkpoints)."""

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module, sample: torch.Tensor,
                 teacher_info: Optional[Dict] = None):
        super().__init__()
        self.alpha, self.temperature, self.feature_weight = cfg.alpha, cfg.temperature, cfg.feature_weight
        self.teacher = [teacher]  # a list, so the teacher is neither a submodule nor in this state_dict
        self.teacher_info = teacher_info or {}
        self.pairs: List[Tuple[str, str]] = []
        for pair in cfg.feature_pairs:
            if ":" not in pair:
                raise ConfigError(f"distillation.feature_pairs entry {pair!r}: write it as STUDENT_LAYER:TEACHER_LAYER")
            s, t = pair.split(":", 1)
            self.pairs.append((s.strip(), t.strip()))
        if cfg.name == "feature" and not self.pairs:
            raise ConfigError("distillation=feature needs distillation.feature_pairs, e.g. ['3:6'] "
                              "(student layer : teacher layer; `trainrun mode=init_report` lists layer names)")
        self._feats: Dict[str, torch.Tensor] = {}
        self._hooks = []
        for i, (s, t) in enumerate(self.pairs):
            self._hooks.append(_named(student, s, "student").register_forward_hook(self._keep(f"s{i}")))
            self._hooks.append(_named(teacher, t, "teacher").register_forward_hook(self._keep(f"t{i}")))
        self.proj = nn.ModuleList()
        if self.pairs:
            was = student.training
            student.eval()
            with torch.no_grad():
                student(sample)
                teacher(sample)
            student.train(was)
            for i, pair in enumerate(cfg.feature_pairs):
                self.proj.append(_projection(self._feats[f"s{i}"].shape, self._feats[f"t{i}"].shape, pair))
            self._feats.clear()

    def _keep(self, key: str) -> Callable:
        def hook(module, inputs, output):
            self._feats[key] = output
        return hook

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor, task_loss: nn.Module,
             autocast) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        teacher = self.teacher[0]
        with torch.no_grad(), autocast():
            teacher_logits = teacher(x)
        task = task_loss(student_logits.float(), target)
        soft = kd_loss(student_logits, teacher_logits, self.temperature)
        total = (1 - self.alpha) * task + self.alpha * soft
        parts = {"loss_task": task.detach(), "loss_kd": soft.detach()}
        if self.pairs:
            with autocast():
                hint = sum(F.mse_loss(self.proj[i](self._feats[f"s{i}"]).float(), self._feats[f"t{i}"].float())
                           for i in range(len(self.pairs)))
            total = total + self.feature_weight * hint
            parts["loss_hint"] = hint.detach()
        self._feats.clear()
        return total, parts


def check(cfg) -> None:
    """Range checks of the distillation section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "distillation")
    checks.one_of("name", ("off", "response", "feature", "self"))
    checks.one_of("teacher_weights", ("auto", "model", "ema"))
    checks.positive("temperature")
    checks.positive("feature_weight", allow_zero=True)
    checks.unit("alpha", closed=True)
    if cfg.name in ("response", "feature") and not cfg.teacher:
        checks.fail("teacher", f"distillation={cfg.name} needs a teacher: distillation.teacher=RUN_DIR "
                               "(a trainrun run or checkpoint directory)")
