import os

os.environ["WANDB_MODE"] = "disabled"

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from trainrun.config import CurriculumConfig, PrecisionConfig
from trainrun.data.curriculum import Curriculum, score_samples
from trainrun.data.datasets import TensorSet
from trainrun.errors import ConfigError
from trainrun.precision import PrecisionPolicy
from trainrun.seed import data_order_generator

N = 100


def make_cfg(**kw):
    cfg = OmegaConf.structured(CurriculumConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def scores_for(n=N, seed=123):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def ranked(scores):
    return torch.sort(scores.double(), stable=True).indices


def test_pacing_formula():
    cur = Curriculum(make_cfg(name="loss"), N, epochs=10, seed=0)
    for e in range(13):
        assert cur.pool_fraction(e) == pytest.approx(min(1.0, 0.2 + 0.8 * e / 10))
    assert cur.pool_fraction(0) == pytest.approx(0.2)
    assert cur.pool_fraction(5) == pytest.approx(0.6)
    assert cur.pool_fraction(10) == 1.0
    # pace_epochs overrides epochs
    cur = Curriculum(make_cfg(name="loss", pace_epochs=4, start_fraction=0.5), N, epochs=10, seed=0)
    assert cur.pool_fraction(2) == pytest.approx(0.75) and cur.pool_fraction(4) == 1.0
    assert Curriculum(make_cfg(), N, 10, 0).pool_fraction(0) == 1.0  # off


def test_flags():
    assert not Curriculum(make_cfg(), N, 10, 0).enabled
    for name in ("loss", "confidence", "self_paced"):
        cur = Curriculum(make_cfg(name=name), N, 10, 0)
        assert cur.enabled and cur.needs_scores
    cur = Curriculum(make_cfg(name="key"), N, 10, 0, difficulty=torch.arange(N))
    assert cur.enabled and not cur.needs_scores


def test_off_is_the_plain_shuffle():
    cur = Curriculum(make_cfg(), N, 10, seed=7)
    for e in range(3):
        assert torch.equal(cur.epoch_order(e), torch.randperm(N, generator=data_order_generator(7, e)))


@pytest.mark.parametrize("name", ["loss", "confidence"])
def test_length_dtype_and_easy_pool(name):
    s = scores_for()
    cur = Curriculum(make_cfg(name=name), N, epochs=10, seed=0)
    rank = ranked(s)
    for e in range(11):
        order = cur.epoch_order(e, s)
        assert order.dtype == torch.int64 and order.shape == (N,)
        k = math.ceil(round(cur.pool_fraction(e) * N, 6))
        easiest = set(rank[:k].tolist())
        assert set(order.tolist()) == easiest  # every pool sample visited, nothing else
        assert cur.last_pool_size == k
        # every pool sample appears floor(N/k) or ceil(N/k) times
        counts = torch.bincount(order, minlength=N)[rank[:k]]
        assert counts.min() >= N // k and counts.max() <= -(-N // k)


def test_pool_sizes_and_float_ceil():
    s = scores_for()
    cur = Curriculum(make_cfg(name="loss"), 10, epochs=10, seed=0)
    sizes = [len(set(cur.epoch_order(e, s[:10]).tolist())) for e in range(11)]
    assert sizes == [2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 10]  # ceil(10 * (0.2 + 0.08 e)), no float spill-over
    # the pool grows with epochs and reaches the full set
    cur = Curriculum(make_cfg(name="loss", start_fraction=0.1), N, epochs=5, seed=3)
    prev = set()
    for e in range(6):
        pool = set(cur.epoch_order(e, s).tolist())
        assert prev <= pool and len(pool) >= len(prev)
        prev = pool
    assert prev == set(range(N))


def test_hard_first_uses_the_hardest():
    s = scores_for()
    cur = Curriculum(make_cfg(name="loss", order="hard_first", start_fraction=0.3), N, epochs=10, seed=0)
    order = cur.epoch_order(0, s)
    assert len(order) == N
    assert set(order.tolist()) == set(ranked(s)[N - 30:].tolist())
    assert s[order].min() >= torch.sort(s).values[N - 30]


def test_ties_broken_by_index():
    s = torch.zeros(N)  # all equal: easiest = lowest indices, hardest = highest
    easy = Curriculum(make_cfg(name="loss", start_fraction=0.1), N, 10, 0).epoch_order(0, s)
    hard = Curriculum(make_cfg(name="loss", order="hard_first", start_fraction=0.1), N, 10, 0).epoch_order(0, s)
    assert set(easy.tolist()) == set(range(10)) and set(hard.tolist()) == set(range(90, 100))


def test_random_fraction_mixed():
    s = scores_for()
    cur = Curriculum(make_cfg(name="loss", random_fraction=0.2), N, epochs=10, seed=0)
    rank = ranked(s)
    for e in range(0, 10):
        order = cur.epoch_order(e, s)
        k = math.ceil(round(cur.pool_fraction(e) * N, 6))
        pool = set(rank[:k].tolist())
        outside = [i for i in order.tolist() if i not in pool]
        assert len(order) == N and len(outside) == round(0.2 * N)
    # pool is everything: all slots come from the full set, still a valid epoch
    order = cur.epoch_order(10, s)
    assert len(order) == N and order.min() >= 0 and order.max() < N
    # odd size: exactly round(r * n)
    cur = Curriculum(make_cfg(name="loss", random_fraction=0.2), 37, epochs=10, seed=0)
    order = cur.epoch_order(0, s[:37])
    pool = set(ranked(s[:37])[:math.ceil(round(0.2 * 37, 6))].tolist())
    assert sum(i not in pool for i in order.tolist()) == round(0.2 * 37)


def test_self_paced_threshold_growth():
    s = torch.linspace(0.0, 3.0, N)  # losses in [0, 3]
    cur = Curriculum(make_cfg(name="self_paced", self_paced_threshold=0.5, self_paced_growth=1.5,
                              start_fraction=0.0), N, 10, 0)
    prev = 0
    for e in range(6):
        order = cur.epoch_order(e, s)
        limit = 0.5 * 1.5 ** e
        expected = {i for i in range(N) if s[i] < limit}
        assert len(order) == N and set(order.tolist()) == expected
        assert len(expected) >= prev
        prev = len(expected)
    assert prev == N  # 0.5 * 1.5**5 = 3.8 > 3
    # nothing below the threshold: the single easiest sample
    cur = Curriculum(make_cfg(name="self_paced", self_paced_threshold=1e-3, start_fraction=0.0), N, 10, 0)
    hi = s + 1.0
    hi[17] = 0.5
    assert set(cur.epoch_order(0, hi).tolist()) == {17}
    # the pool never falls below start_fraction of the data (the easiest ones)
    cur = Curriculum(make_cfg(name="self_paced", self_paced_threshold=1e-3, start_fraction=0.2), N, 10, 0)
    assert set(cur.epoch_order(0, s).tolist()) == set(range(20))
    with pytest.raises(ConfigError):
        Curriculum(make_cfg(name="self_paced", order="hard_first"), N, 10, 0)


def test_key_mode():
    key = torch.arange(N, 0, -1)  # sample N-1 is the easiest
    cur = Curriculum(make_cfg(name="key", start_fraction=0.1), N, 10, 0, difficulty=key)
    order = cur.epoch_order(0)
    assert set(order.tolist()) == set(range(90, 100))
    assert cur.state_dict() == {}
    with pytest.raises(ConfigError, match="difficulty"):
        Curriculum(make_cfg(name="key"), N, 10, 0)
    with pytest.raises(ConfigError, match="100"):
        Curriculum(make_cfg(name="key"), N, 10, 0, difficulty=torch.arange(N - 1))
    with pytest.raises(ConfigError):
        Curriculum(make_cfg(name="key"), N, 10, 0, difficulty=torch.full((N,), float("nan")))


def test_missing_or_bad_scores():
    cur = Curriculum(make_cfg(name="loss"), N, 10, 0)
    with pytest.raises(ValueError):
        cur.epoch_order(0)
    with pytest.raises(ValueError):
        cur.epoch_order(0, torch.rand(N + 1))
    s = scores_for()
    s[5] = float("nan")  # a NaN loss counts as the hardest
    cur = Curriculum(make_cfg(name="loss", start_fraction=0.99), N, 10, 0)
    assert 5 not in set(cur.epoch_order(0, s).tolist())


def test_determinism_and_no_global_rng():
    s = scores_for()
    cfg = make_cfg(name="loss", random_fraction=0.2)
    a, b = Curriculum(cfg, N, 10, seed=5), Curriculum(cfg, N, 10, seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    o1 = a.epoch_order(3, s)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # global RNG has no influence
    o2 = b.epoch_order(3, s.clone())
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, a.epoch_order(4, s))
    assert not torch.equal(o1, Curriculum(cfg, N, 10, seed=6).epoch_order(3, s))
    state = torch.get_rng_state()
    Curriculum(make_cfg(), N, 10, 0).epoch_order(2)
    Curriculum(make_cfg(name="self_paced"), N, 10, 0).epoch_order(2, s)
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_round_trip_and_mid_epoch_resume():
    s = scores_for()
    cfg = make_cfg(name="confidence", random_fraction=0.1)
    cur = Curriculum(cfg, N, 10, seed=1)
    assert cur.state_dict() == {}
    order = cur.epoch_order(2, s)
    buf = io.BytesIO()
    torch.save(cur.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = Curriculum(cfg, N, 10, seed=1)
    assert not fresh.has_scores(2)
    fresh.load_state_dict(sd)
    assert fresh.has_scores(2) and not fresh.has_scores(3)
    assert torch.equal(fresh.epoch_order(2), order)  # resumed mid-epoch: same order without rescoring
    with pytest.raises(ValueError):
        fresh.epoch_order(3)
    fresh.load_state_dict({})
    assert not fresh.has_scores(2)
    # a checkpoint from another curriculum is not reused
    other = Curriculum(make_cfg(name="loss"), N, 10, seed=1)
    with pytest.warns(UserWarning):
        other.load_state_dict(sd)
    assert not other.has_scores(2)
    # off / key need nothing
    off = Curriculum(make_cfg(), N, 10, 0)
    assert off.state_dict() == {}
    off.load_state_dict({})


def _setup(train=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1, 2, 3, generator=g)
    y = torch.randint(0, 4, (37,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Dropout(0.5))
    model.train(train)
    prec = PrecisionPolicy(OmegaConf.structured(PrecisionConfig), torch.device("cpu"))
    return model, TensorSet(x, y), prec


@pytest.mark.parametrize("kind", ["loss", "self_paced"])
def test_score_samples_loss(kind):
    model, ds, prec = _setup()
    s = score_samples(model, ds, kind, prec, torch.device("cpu"), batch_size=8)
    assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (37,)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(ds.x), ds.y, reduction="none")
    assert torch.allclose(s, ref, atol=1e-6)


def test_score_samples_confidence_and_modes():
    model, ds, prec = _setup(train=False)
    model[2].train()  # mixed modes are restored module by module
    s = score_samples(model, ds, "confidence", prec, "cpu", batch_size=10)
    assert not model.training and model[2].training and not model[1].training
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(ds.x), dim=1)[torch.arange(37), ds.y]
    assert torch.allclose(s, 1 - p, atol=1e-6)
    assert ((s >= 0) & (s <= 1)).all()
    with pytest.raises(ValueError):
        score_samples(model, ds, "bogus", prec, "cpu")


def test_score_samples_fileset_like():
    """FileSet path: dataset.load(i, sample_seed=0) for each i."""
    model, ds, prec = _setup()

    class Files:
        def __init__(self, ts):
            self.ts, self.y, self.seeds = ts, ts.y, set()

        def __len__(self):
            return len(self.ts)

        def load(self, i, sample_seed):
            self.seeds.add(sample_seed)
            return self.ts.x[i], int(self.ts.y[i])

    files = Files(ds)
    a = score_samples(model, files, "loss", prec, "cpu", batch_size=16)
    b = score_samples(model, ds, "loss", prec, "cpu", batch_size=16)
    assert torch.allclose(a, b) and files.seeds == {0}


def test_end_to_end_with_scores():
    model, ds, prec = _setup()
    s = score_samples(model, ds, "loss", prec, "cpu")
    cur = Curriculum(make_cfg(name="loss", start_fraction=0.5), len(ds), 4, seed=0)
    order = cur.epoch_order(0, s)
    assert len(order) == len(ds)
    assert s[order].max() <= torch.sort(s).values[math.ceil(0.5 * len(ds)) - 1]
