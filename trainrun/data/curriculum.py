"""Curriculum learning: which training samples each epoch visits, and in which order.

Every epoch keeps its full length of `n_train` slots; the curriculum only decides the *pool* the
epoch draws from (Hacohen & Weinshall 2019, "On the power of curriculum learning"):

- difficulty: model scores (`loss`, `confidence` = 1 - p(true class); higher = harder), or a
  per-sample key given by the data (`key`); ties are broken by sample index.
- pacing: fraction = min(1, start + (1 - start) * epoch / pace_epochs); `easy_first` draws from
  the easiest ceil(fraction * n) samples, `hard_first` (anti-curriculum) from the hardest.
- `self_paced`: the pool is the samples whose loss is below threshold * growth**epoch (at least one).
- mixed curriculum: `random_fraction` of the slots are drawn from outside the pool.

The order is a pure function of (seed, epoch, scores or key, config): all randomness comes from
`trainrun.seed.data_order_generator(seed, epoch)`, never from the global RNG. Scores are computed
from the model at the start of an epoch, so a run resumed in the middle of that epoch cannot
recompute them; `state_dict()` therefore keeps the scores the current epoch was ordered with and
`epoch_order(epoch)` reuses them (see `has_scores`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from trainrun.errors import ConfigError
from trainrun.seed import data_order_generator

NAMES = ("off", "loss", "confidence", "key", "self_paced")
ORDERS = ("easy_first", "hard_first")
SCORED = ("loss", "confidence", "self_paced")


def _fill(pool: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k indices from `pool`: fresh random permutations of it, concatenated as often as needed."""
    if k <= 0 or len(pool) == 0:
        return torch.empty(0, dtype=torch.int64)
    reps = -(-k // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:k]


class Curriculum:
    """Which training samples each epoch visits, and in which order (curriculum learning)."""

    def __init__(self, cfg, n_train: int, epochs: int, seed: int, difficulty: Optional[torch.Tensor] = None):
        self.name, self.order = str(cfg.name), str(cfg.order)
        if self.name not in NAMES:
            raise ConfigError(f"curriculum.name={self.name!r}: must be one of {', '.join(NAMES)}")
        if self.order not in ORDERS:
            raise ConfigError(f"curriculum.order={self.order!r}: must be one of {', '.join(ORDERS)}")
        if self.name == "self_paced" and self.order != "easy_first":
            raise ConfigError("curriculum.order=hard_first: self_paced always trains on the samples below the loss "
                              "threshold (easy first); use curriculum=loss with order=hard_first for an anti-curriculum")
        if n_train < 1:
            raise ConfigError(f"curriculum: the training set is empty (n_train={n_train})")
        self.n, self.seed = int(n_train), int(seed)
        self.start = float(cfg.start_fraction)
        self.pace_epochs = int(cfg.pace_epochs) or int(epochs)
        self.random_fraction = float(cfg.random_fraction)
        self.threshold, self.growth = float(cfg.self_paced_threshold), float(cfg.self_paced_growth)
        if not 0.0 <= self.start <= 1.0:
            raise ConfigError(f"curriculum.start_fraction={self.start}: must be in [0, 1]")
        if not 0.0 <= self.random_fraction < 1.0:
            raise ConfigError(f"curriculum.random_fraction={self.random_fraction}: must be in [0, 1)")
        if self.name == "self_paced" and not (self.threshold > 0 and self.growth > 0):
            raise ConfigError("curriculum.self_paced_threshold and curriculum.self_paced_growth must be > 0")

        self.difficulty: Optional[torch.Tensor] = None
        if self.name == "key":
            if difficulty is None:
                raise ConfigError("curriculum=key needs a per-sample difficulty from the dataset, and this dataset "
                                  "provides none; use curriculum=loss or curriculum=confidence")
            d = torch.as_tensor(difficulty).detach().cpu()
            if d.ndim != 1 or len(d) != self.n:
                raise ConfigError(f"curriculum=key: the difficulty has shape {tuple(d.shape)} but the training set "
                                  f"has {self.n} samples; it needs one value per training sample")
            d = d.to(torch.float64)
            if not torch.isfinite(d).all():
                raise ConfigError(f"curriculum=key: the difficulty has {int((~torch.isfinite(d)).sum())} "
                                  "NaN/inf values; give every training sample a finite difficulty")
            self.difficulty = d
        # Scores the current epoch was ordered with: a mid-epoch resume cannot recompute them.
        self._scores_epoch: Optional[int] = None
        self._scores: Optional[torch.Tensor] = None
        self.last_pool_size: int = self.n  # pool size of the last epoch_order call (for logging)

    # ------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        return self.name != "off"

    @property
    def needs_scores(self) -> bool:
        """loss / confidence / self_paced need `score_samples(model, ...)` at each epoch start."""
        return self.name in SCORED

    @property
    def score_kind(self) -> str:
        """The `kind` to pass to `score_samples`."""
        return self.name

    def has_scores(self, epoch: int) -> bool:
        """True when scores for `epoch` are kept (e.g. restored from a checkpoint mid-epoch): do not rescore."""
        return self._scores is not None and self._scores_epoch == int(epoch)

    # ------------------------------------------------------------------ pacing
    def pool_fraction(self, epoch: int) -> float:
        if not self.enabled or self.pace_epochs <= 0:
            return 1.0
        return min(1.0, self.start + (1.0 - self.start) * epoch / self.pace_epochs)

    def _pool_size(self, epoch: int) -> int:
        # round() first so that e.g. 0.6000000000000001 * 10 does not become 7 samples
        k = math.ceil(round(self.pool_fraction(epoch) * self.n, 6))
        return max(1, min(self.n, k))

    def _checked_scores(self, epoch: int, scores: Optional[torch.Tensor]) -> torch.Tensor:
        if scores is None:
            if self.has_scores(epoch):
                return self._scores  # type: ignore[return-value]
            raise ValueError(f"curriculum={self.name} needs per-sample scores for epoch {epoch} "
                             "(score_samples(model, train_set, curriculum.score_kind, ...))")
        s = torch.as_tensor(scores).detach().to("cpu", torch.float32).flatten()
        if len(s) != self.n:
            raise ValueError(f"curriculum: got {len(s)} scores for a training set of {self.n} samples")
        s = s.clone()
        self._scores_epoch, self._scores = int(epoch), s
        return s

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = data_order_generator(self.seed, epoch)
        n = self.n
        if not self.enabled:  # the plain shuffled epoch, identical to BatchStream.order
            self.last_pool_size = n
            return torch.randperm(n, generator=g)

        if self.name == "key":
            diff = self.difficulty
        else:
            diff = self._checked_scores(epoch, scores).to(torch.float64)
            diff = torch.nan_to_num(diff, nan=math.inf)  # a non-finite score counts as hardest
        # ascending difficulty; the stable sort breaks ties by sample index
        ranked = torch.sort(diff, stable=True).indices  # type: ignore[arg-type]

        if self.name == "self_paced":
            # samples below the growing loss threshold, but never fewer than start_fraction of the data:
            # at init every loss is ~log(K), and a pool of one sample would stall training
            limit = self.threshold * self.growth ** epoch
            floor = max(1, math.ceil(round(self.start * n, 6)))
            k = max(floor, int((diff < limit).sum()))
            pool, rest = ranked[:k], ranked[k:]
        else:
            k = self._pool_size(epoch)
            if self.order == "easy_first":
                pool, rest = ranked[:k], ranked[k:]
            else:
                pool, rest = ranked[n - k:], ranked[:n - k]
        self.last_pool_size = k

        n_random = round(self.random_fraction * n)
        outside = rest if len(rest) else ranked
        order = torch.cat([_fill(pool, n - n_random, g), _fill(outside, n_random, g)])
        return order[torch.randperm(n, generator=g)].to(torch.int64)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """The scores of the epoch in progress (a float32 tensor of n values) when the curriculum is scored,
        so that a mid-epoch resume replays the same order; {} otherwise."""
        if not self.needs_scores or self._scores is None:
            return {}
        return {"name": self.name, "n": self.n, "epoch": int(self._scores_epoch), "scores": self._scores.clone()}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self._scores_epoch, self._scores = None, None
        if not d or not self.needs_scores:
            return
        if d.get("name") != self.name or int(d.get("n", -1)) != self.n or "scores" not in d:
            warnings.warn(f"curriculum: the checkpoint's scores are for curriculum={d.get('name')} over "
                          f"{d.get('n')} samples, this run uses curriculum={self.name} over {self.n}: "
                          "rescoring, so the resumed epoch's order differs")
            return
        s = torch.as_tensor(d["scores"]).to("cpu", torch.float32).flatten()
        if len(s) != self.n:
            warnings.warn("curriculum: the checkpoint's scores have the wrong length; rescoring")
            return
        self._scores_epoch, self._scores = int(d["epoch"]), s.clone()


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def score_samples(model, dataset, kind: str, precision, device, batch_size: int = 512) -> torch.Tensor:
    """Per-sample difficulty over the whole training set in index order (higher = harder).

    kind "loss" / "self_paced": per-sample cross-entropy in fp32; "confidence": 1 - softmax probability of
    the true class. The model runs in eval mode (each module's mode is restored afterwards) under
    `precision.autocast()`. FileSet samples are loaded with sample_seed=0 (a fixed view). Returns CPU float32.
    """
    if kind not in SCORED:
        raise ValueError(f"score_samples: kind must be one of {', '.join(SCORED)}, got {kind!r}")
    device = torch.device(device)
    n = len(dataset)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = torch.empty(n, dtype=torch.float32)
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if hasattr(dataset, "x"):  # TensorSet
                x, y = dataset.x[start:stop], dataset.y[start:stop]
            else:  # FileSet
                items = [dataset.load(i, 0) for i in range(start, stop)]
                x = torch.stack([t for t, _ in items])
                y = torch.as_tensor([int(c) for _, c in items], dtype=torch.int64)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with precision.autocast():
                logits = _logits(model, x)
            logits = logits.float()
            if kind == "confidence":
                p = torch.softmax(logits, dim=-1).gather(1, y.unsqueeze(1)).squeeze(1)
                s = 1.0 - p
            else:
                s = F.cross_entropy(logits, y, reduction="none")
            out[start:stop] = s.to("cpu", torch.float32)
    finally:
        for m, training in modes:
            m.training = training
    return out


def check(cfg) -> None:
    """Range checks of the curriculum section (the rules that span sections are in config.validate)."""
    from trainrun.checks import SectionChecks

    checks = SectionChecks(cfg, "curriculum")
    checks.one_of("name", ("off", "loss", "confidence", "key", "self_paced"))
    checks.one_of("order", ("easy_first", "hard_first"))
    checks.positive("self_paced_threshold", "self_paced_growth")
    checks.positive("pace_epochs", allow_zero=True)
    checks.unit("random_fraction")
    checks.unit("start_fraction", closed=True)
