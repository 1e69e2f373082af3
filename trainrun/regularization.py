"""Regularization: losses (label smoothing, focal, class weights), MixUp/CutMix, random erasing,
stochastic depth, EMA of weights, early stopping, and the dropout setting.

Gradient clipping lives in the precision policy's step, where it must sit between unscale and step.
All randomness here draws from the global torch RNG, which checkpoints capture and restore.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainrun.errors import ConfigError


# --- losses ----------------------------------------------------------------------------------

def class_weights(cfg, train_labels: torch.Tensor, num_classes: int) -> Optional[torch.Tensor]:
    """Explicit `class_weights`, or balanced weights N / (K * n_c) from the training labels."""
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise ConfigError(f"regularization.class_weights has {len(cfg.class_weights)} entries but the data has "
                              f"{num_classes} classes; give one weight per class")
        return torch.tensor(list(cfg.class_weights), dtype=torch.float32)
    if cfg.balance_classes:
        counts = torch.bincount(train_labels.cpu(), minlength=num_classes).float()
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()[:5]
            raise ConfigError(f"regularization.balance_classes: classes {missing} have no training samples; "
                              "set regularization.class_weights explicitly")
        return len(train_labels) / (num_classes * counts)
    return None


class FocalLoss(nn.Module):
    """FL = -sum_c w_c y_c (1 - p_c)^gamma log p_c, mean over the batch (Lin et al. 2017).

    Accepts class indices or probability targets (MixUp/CutMix); label smoothing as in torch's CE.
    With gamma = 0 and no smoothing it equals cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        probs_t = F.one_hot(target, k).to(logits.dtype) if target.ndim == 1 else target
        if self.label_smoothing:
            probs_t = probs_t * (1 - self.label_smoothing) + self.label_smoothing / k
        logp = F.log_softmax(logits, dim=1)
        loss = -((1 - logp.exp()).pow(self.gamma) * logp * probs_t)
        if self.weight is not None:
            loss = loss * self.weight
        return loss.sum(1).mean()


class WeightedCrossEntropy(nn.CrossEntropyLoss):
    """Class-weighted cross-entropy normalised by the batch's total weight for both target types.

    torch divides by sum_i w[y_i] for class indices but by N for probability targets, so with MixUp/CutMix at
    mix_prob < 1 the loss scale (the effective LR) would jump between mixed and plain batches. For probability
    targets t_i this divides by sum_i w . t_i (t before label smoothing), which equals sum_i w[y_i] when t_i is
    one-hot: the two target types then give the same value for the same labels, also with label smoothing.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return super().forward(logits, target)
        total = F.cross_entropy(logits, target, weight=self.weight, reduction="sum",
                                label_smoothing=self.label_smoothing)
        return total / (target @ self.weight.to(target.dtype)).sum()


def build_loss(cfg, weight: Optional[torch.Tensor] = None) -> nn.Module:
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight, cfg.label_smoothing)
    # torch's label smoothing is exactly y = (1 - eps) * onehot + eps / K, also for probability targets.
    if weight is not None:
        return WeightedCrossEntropy(weight=weight, label_smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def effective_dropout(reg_cfg, model_cfg) -> float:
    return model_cfg.dropout if reg_cfg.dropout is None else reg_cfg.dropout


# --- batch augmentations ---------------------------------------------------------------------

class BatchAugment:
    """MixUp / CutMix (torchvision.transforms.v2 semantics: pair with the batch rolled by one, soft labels)
    and per-sample random erasing. Returns (x, targets) where targets are class indices or probabilities."""

    def __init__(self, cfg, num_classes: int):
        self.mix, self.erase, self.mix_prob = None, None, cfg.mix_prob
        if not (cfg.cutmix_alpha > 0 or cfg.mixup_alpha > 0 or cfg.random_erasing > 0):
            return  # no torchvision import when nothing is on (~1 s of startup)
        from torchvision.transforms import v2

        mixers = []
        if cfg.cutmix_alpha > 0:
            mixers.append((v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes), cfg.switch_prob))
        if cfg.mixup_alpha > 0:
            mixers.append((v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes), 1 - cfg.switch_prob))
        if len(mixers) == 1:
            self.mix = mixers[0][0]
        elif mixers:
            self.mix = v2.RandomChoice([m for m, _ in mixers], p=[p for _, p in mixers])
        self.erase = v2.RandomErasing(p=cfg.random_erasing, value=0) if cfg.random_erasing > 0 else None

    @property
    def enabled(self) -> bool:
        return self.mix is not None or self.erase is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.erase is not None:
            x = torch.stack([self.erase(img) for img in x])
        if self.mix is not None and (self.mix_prob >= 1 or float(torch.rand(())) < self.mix_prob):
            x, y = self.mix(x, y)
        return x, y


# --- stochastic depth ------------------------------------------------------------------------

def stochastic_depth_rates(p: float, n: int) -> List[float]:
    """Linear decay rule: block l of n drops its branch with probability p * l / n."""
    return [p * i / n for i in range(1, n + 1)]


def add_stochastic_depth(model: nn.Module, p: float) -> int:
    """Drop each residual branch per sample: ResNet blocks with probability p * l / L for block l of L (Huang et al.
    2016, torchvision's rule), ViT blocks with timm's drop_path_rate rule (linspace(0, p, L); models/vit.py).

    Implemented as forward hooks on the branch's output, so the state dict keys do not change.
    Returns the number of blocks; raises if the model has neither kind of block.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops import stochastic_depth

    from trainrun.models.vit import add_drop_path

    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    if not blocks:
        vit_blocks = add_drop_path(model, p)
        if vit_blocks:
            return vit_blocks
        raise ConfigError("regularization.stochastic_depth needs a model with residual blocks (resnet18/resnet50, "
                          "vit_tiny); set it to 0 for this model")
    for block, rate in zip(blocks, stochastic_depth_rates(p, len(blocks))):
        last_norm = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        last_norm.register_forward_hook(
            lambda mod, inp, out, rate=rate: stochastic_depth(out, rate, "row", training=mod.training))
    return len(blocks)


# --- EMA of weights --------------------------------------------------------------------------

def reference_ema_decay(decay: float, global_batch: int, every: int, epochs: float) -> float:
    """torchvision's references/classification/train.py adjustment (from pycls): with
    adjust = global batch x EMA interval / epochs, alpha = min(1, (1 - decay) * adjust); the EMA decays by 1 - alpha.
    It keeps the averaging horizon the same share of the run whatever the batch, the interval and the length."""
    alpha = min(1.0, (1.0 - decay) * (global_batch * every / epochs))
    return 1.0 - alpha


class EMA:
    """Exponential moving average of the weights: ema = d * ema + (1 - d) * w, every `every` applied optimizer steps
    (after steps 1, 1 + every, 1 + 2 every, ...; a step the NaN guard skips does not count).

    Two styles. trainrun's (reference_warmup_steps None): with warmup, d_t = min(decay, (1 + t) / (10 + t)) for the
    t-th update, so early averages are not dominated by the init. torchvision's reference (an int): the EMA is an
    AveragedModel whose first update copies the weights, and an update after step <= reference_warmup_steps (the LR
    warmup) resets its count, so the next update copies again; the average starts only after the warmup.
    Float buffers (BatchNorm statistics) are averaged too; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, every: int = 1,
                 reference_warmup_steps: Optional[int] = None):
        self.decay, self.warmup, self.every = decay, warmup, every
        self.reference_warmup_steps = reference_warmup_steps
        self.updates = 0  # EMA updates made
        self.steps = 0  # update() calls: applied optimizer steps
        self.averaged = 0  # reference style: AveragedModel.n_averaged (0: the next update copies)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs(model)

    @classmethod
    def from_config(cls, model: nn.Module, reg, global_batch: int, epochs: float,
                    warmup_steps: int) -> Optional["EMA"]:
        """The EMA the regularization section asks for (None with ema_decay 0): `epochs` is the run's length in epochs
        and `warmup_steps` the schedule's warmup, both used only by ema_adjust=reference."""
        if reg.ema_decay <= 0:
            return None
        every = getattr(reg, "ema_every", 1) or 1
        if getattr(reg, "ema_adjust", "none") == "reference":
            return cls(model, reference_ema_decay(reg.ema_decay, global_batch, every, epochs), warmup=False,
                       every=every, reference_warmup_steps=warmup_steps)
        return cls(model, reg.ema_decay, reg.ema_warmup, every=every)

    def _pairs(self, model: nn.Module) -> None:
        ema_state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        src_state = dict(model.named_parameters()) | dict(model.named_buffers())
        self.float_pairs = [(ema_state[k], v) for k, v in src_state.items() if v.is_floating_point()]
        self.other_pairs = [(ema_state[k], v) for k, v in src_state.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Called after every applied optimizer step; averages on the steps of the interval only."""
        self.steps += 1
        if (self.steps - 1) % self.every:
            return
        if self.reference_warmup_steps is None:
            d = self.current_decay()
            torch._foreach_lerp_([e for e, _ in self.float_pairs], [s.detach() for _, s in self.float_pairs], 1.0 - d)
        else:
            self._reference_update()
        for e, s in self.other_pairs:
            e.copy_(s)
        self.updates += 1

    def _reference_update(self) -> None:
        ema, src = [e for e, _ in self.float_pairs], [s.detach() for _, s in self.float_pairs]
        if self.averaged == 0:
            torch._foreach_copy_(ema, src)
        else:  # decay * ema + (1 - decay) * w, the reference's own arithmetic (not lerp), so it matches bit for bit
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, torch._foreach_mul(src, 1.0 - self.decay))
        self.averaged += 1
        if self.steps <= self.reference_warmup_steps:
            self.averaged = 0

    def state_dict(self) -> Dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "steps": self.steps,
                "averaged": self.averaged}

    def load_state_dict(self, state: Dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        # checkpoints from before ema_every updated on every step: steps == updates there
        self.steps = int(state.get("steps", self.updates))
        self.averaged = int(state.get("averaged", self.updates))


# --- early stopping --------------------------------------------------------------------------

class EarlyStopping:
    """Stop after `patience` evaluations without an improvement larger than `min_delta`; keeps the best weights."""

    def __init__(self, patience: int, min_delta: float, mode: str, keep_best_weights: bool):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.keep_best_weights = keep_best_weights
        self.best: Optional[float] = None
        self.best_step = -1
        self.bad_evals = 0
        self.best_weights: Optional[Dict[str, torch.Tensor]] = None

    def improved(self, value: float) -> bool:
        if value is None or value != value:
            return False
        if self.best is None:
            return True
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def step(self, value: Optional[float], step: int, model: nn.Module) -> bool:
        """Record one evaluation of `model` (the module that was evaluated: the EMA copy when EMA is on);
        True when training should stop."""
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            if self.keep_best_weights:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def state_dict(self) -> Dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: Dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        self.best_weights = state["best_weights"]


def check(cfg) -> None:
    """Range checks of the regularization section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "regularization")
    checks.one_of("loss", ("ce", "focal"))
    checks.positive("clip_grad_norm", "clip_grad_value")
    checks.positive("focal_gamma", "mixup_alpha", "cutmix_alpha", "early_stopping_patience",
                    "early_stopping_min_delta", allow_zero=True)
    checks.unit("label_smoothing", "dropout", "stochastic_depth", "ema_decay")
    checks.positive("ema_every")
    checks.one_of("ema_adjust", ("none", "reference"))
    if cfg.ema_adjust == "reference" and cfg.ema_warmup:
        checks.fail("ema_warmup", "ema_adjust=reference warms the EMA up as torchvision's reference does (it copies "
                                  "the weights during the LR warmup); set regularization.ema_warmup=false")
    checks.unit("mix_prob", "switch_prob", "random_erasing", closed=True)
    weights = cfg.class_weights
    if weights is not None and (not len(weights) or min(weights) < 0):
        checks.fail("class_weights", "must be one non-negative weight per class")
    if weights is not None and cfg.balance_classes:
        checks.fail("balance_classes", "choose class_weights or balance_classes, not both")
    if cfg.clip_grad_norm is not None and cfg.clip_grad_value is not None:
        checks.fail("clip_grad_value", "choose clip_grad_norm or clip_grad_value, not both")
