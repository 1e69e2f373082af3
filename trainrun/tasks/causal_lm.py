"""Causal language modelling: the model maps token blocks [N, T] to next-token logits [N, T, V]; the targets are the
blocks shifted by one (data=text), with `task.ignore_index` marking tokens no loss is taken on (prompt or padding).

The loss is the mean over *counted* tokens of the whole optimizer step: the loop asks `counted_tokens` of every
micro-batch first, adds them up (and over ranks), and back-propagates each micro-batch's summed loss divided by
that total. Averaging per micro-batch and then over micro-batches (or ranks) weights a token of a short micro-batch
more than one of a long one: the known gradient-accumulation mistake. Metrics: val/loss (nats per counted token),
val/ppl = exp(val/loss), train/ppl and tokens/s."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from trainrun.errors import DataError
from trainrun.tasks import TASKS, Task


@TASKS.register("causal_lm", doc="next-token prediction over token blocks: token-averaged cross-entropy, perplexity")
class CausalLM(Task):
    name = "causal_lm"
    token_weighted = True  # the loop normalises the step's loss by its counted tokens (see the module doc)

    def __init__(self, cfg, loss_fn, output_shape, class_names=None):
        super().__init__(cfg, loss_fn, output_shape, class_names)
        self.ignore_index = int(cfg.ignore_index) if cfg is not None else -100
        self.vocab_size = int(output_shape[-1])

    @staticmethod
    def metric_names(task_cfg) -> Tuple[str, ...]:
        return ("loss", "ppl")

    def accepted_output_shapes(self) -> Sequence[Tuple[int, ...]]:
        return (self.output_shape,)

    def output_meaning(self) -> str:
        return "one logit per vocabulary token at every position"

    def counted_tokens(self, target: torch.Tensor) -> torch.Tensor:
        return (target != self.ignore_index).sum()

    def summed_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The cross-entropy summed over the counted tokens, in fp32."""
        return F.cross_entropy(output.float().reshape(-1, output.shape[-1]), target.reshape(-1),
                               ignore_index=self.ignore_index, reduction="sum")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean over this batch's counted tokens (the doctor's re-runs and distillation use it)."""
        return self.summed_loss(output, target) / self.counted_tokens(target).clamp(min=1)

    def window_metrics(self, mean_loss: float, samples_per_s: float) -> Dict[str, float]:
        """What a log window adds to train/loss: perplexity, and tokens/s (every position of every block)."""
        return {"train/ppl": _exp(mean_loss), "tokens_per_s": samples_per_s * self.output_shape[0]}

    def eval_sums(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": self.summed_loss(output, target).double(), "tokens": self.counted_tokens(target).double()}

    def eval_metrics(self, sums: Dict[str, torch.Tensor], n: int) -> Dict[str, float]:
        tokens = float(sums["tokens"])
        loss = float(sums["loss"]) / tokens if tokens else float("nan")
        return {"val/loss": loss, "val/ppl": _exp(loss)}

    def initial_loss(self) -> Optional[float]:
        return math.log(self.vocab_size)

    def check_targets(self, y: torch.Tensor, what: str) -> None:
        if y.is_floating_point() or y.ndim != 2:
            raise DataError(f"{what}: task=causal_lm needs integer token blocks [N, T] as targets, got {y.dtype} "
                            f"of shape {list(y.shape)}; use data=text (or a dataset of token ids)")
        counted = y[y != self.ignore_index]
        if counted.numel() == 0:
            raise DataError(f"{what}: every target token equals task.ignore_index={self.ignore_index}: nothing to "
                            "learn from; check the masking")
        lo, hi = int(counted.min()), int(counted.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(f"{what}: token ids span [{lo}, {hi}] but the vocabulary has {self.vocab_size} tokens "
                            f"(0..{self.vocab_size - 1}); use the tokenizer the data was made with, or set "
                            "task.ignore_index to the padding id")


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
