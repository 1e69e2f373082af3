"""Data sets, deterministic batching, and checkpoint integrity."""
import os

os.environ["WANDB_MODE"] = "disabled"

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from trainrun import checkpoint as ck  # noqa: E402
from trainrun.config import DataConfig  # noqa: E402
from trainrun.data import BatchStream, TensorSet, build_split  # noqa: E402
from trainrun.errors import CheckpointError, DataError  # noqa: E402
from trainrun.seed import capture_rng_state  # noqa: E402


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return build_split(data_cfg(name="digits"))


def test_digits_split_sizes(digits):
    assert len(digits.train) == 1438 and len(digits.val) == 359
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.train.x.shape == (1438, 1, 8, 8) and digits.train.x.dtype == torch.float32
    assert digits.train.y.dtype == torch.int64
    assert set(digits.train.y.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = build_split(data_cfg(name="digits"))
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.train.y, digits.train.y)
    assert torch.equal(again.val.x, digits.val.x) and torch.equal(again.val.y, digits.val.y)
    # the split is not affected by the global RNG
    torch.manual_seed(999)
    third = build_split(data_cfg(name="digits"))
    assert torch.equal(third.val.x, digits.val.x)
    # train and val together are the whole set: the label counts add up to the raw ones
    from sklearn.datasets import load_digits

    raw = Counter(load_digits().target.tolist())
    assert Counter(digits.train.y.tolist()) + Counter(digits.val.y.tolist()) == raw


def test_digits_standardized(digits):
    x = digits.train.x
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-4)
    # val uses train's statistics: close to, but not exactly, standardized
    assert abs(digits.val.x.mean().item()) < 0.1
    assert digits.val.x.mean().item() != pytest.approx(0.0, abs=1e-6)


def test_digits_fingerprint(digits):
    again = build_split(data_cfg(name="digits"))
    assert again.fingerprint == digits.fingerprint
    assert len(digits.fingerprint) == 64
    other = build_split(data_cfg(name="digits", split_seed=1))
    assert other.fingerprint != digits.fingerprint
    assert not torch.equal(other.val.y, digits.val.y)
    assert len(other.train) == 1438
    assert build_split(data_cfg(name="digits", val_fraction=0.3)).fingerprint != digits.fingerprint


def test_limit_train_and_val():
    s = build_split(data_cfg(name="digits", limit_train=100, limit_val=50))
    assert len(s.train) == 100 and len(s.val) == 50


# ---------------------------------------------------------------------------------------------
# BatchStream
# ---------------------------------------------------------------------------------------------

def _ts(n=50):
    return TensorSet(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.arange(n) % 3)


def test_epoch_order_is_pure_function_of_seed_and_epoch():
    ds = _ts()
    a = BatchStream(ds, 8, seed=5, shuffle=True, drop_last=True)
    torch.manual_seed(1)
    o1 = a.order(3)
    torch.manual_seed(2)
    torch.rand(100)
    b = BatchStream(ds, 8, seed=5, shuffle=True, drop_last=True)
    assert torch.equal(b.order(3), o1)
    assert torch.equal(a.order(3), o1)
    assert sorted(o1.tolist()) == list(range(50))  # a permutation
    assert not torch.equal(a.order(4), o1)
    assert not torch.equal(BatchStream(ds, 8, seed=6, shuffle=True, drop_last=True).order(3), o1)
    assert not torch.equal(o1, torch.arange(50))
    # the samples yielded follow the order
    xs = torch.cat([x.flatten() for x, _, _ in a.iter_epoch(3)])
    assert xs.long().tolist() == o1[:48].tolist()


def test_unshuffled_order():
    s = BatchStream(_ts(10), 4, seed=0, shuffle=False, drop_last=False)
    assert [idx.tolist() for _, _, idx in s.iter_epoch(7)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_start_at_batch_k_yields_tail(k):
    s = BatchStream(_ts(50), 8, seed=11, shuffle=True, drop_last=True)
    full = list(s.iter_epoch(2))
    tail = list(s.iter_epoch(2, start=k))
    assert len(full) == 6 and len(tail) == 6 - k
    for (x1, y1, i1), (x2, y2, i2) in zip(full[k:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)


def test_drop_last_semantics():
    ds = _ts(10)
    dl = BatchStream(ds, 3, seed=0, shuffle=True, drop_last=True)
    assert dl.batches_per_epoch == 3
    batches = list(dl.iter_epoch(0))
    assert [len(y) for _, y, _ in batches] == [3, 3, 3]
    assert len(set(torch.cat([i for _, _, i in batches]).tolist())) == 9

    keep = BatchStream(ds, 3, seed=0, shuffle=True, drop_last=False)
    assert keep.batches_per_epoch == 4
    batches = list(keep.iter_epoch(0))
    assert [len(y) for _, y, _ in batches] == [3, 3, 3, 1]
    assert sorted(torch.cat([i for _, _, i in batches]).tolist()) == list(range(10))

    exact = BatchStream(_ts(9), 3, seed=0, shuffle=True, drop_last=True)
    assert exact.batches_per_epoch == 3
    assert BatchStream(_ts(9), 3, seed=0, shuffle=True, drop_last=False).batches_per_epoch == 3


def test_batch_yields_matching_x_y():
    ds = _ts(20)
    s = BatchStream(ds, 6, seed=3, shuffle=True, drop_last=False)
    for x, y, idx in s.iter_epoch(1):
        assert torch.equal(x, ds.x[idx]) and torch.equal(y, ds.y[idx])


# ---------------------------------------------------------------------------------------------
# data=tensors
# ---------------------------------------------------------------------------------------------

def _write_tensors(tmp_path, x, y, name="d.pt"):
    p = tmp_path / name
    torch.save({"x": x, "y": y}, p)
    return p


def _good_xy(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3


def test_tensors_file_loads(tmp_path):
    x, y = _good_xy()
    p = _write_tensors(tmp_path, x, y)
    s = build_split(data_cfg(name="tensors", root=str(p)))
    assert len(s.train) == 16 and len(s.val) == 4
    assert s.num_classes == 3
    assert s.input_shape == (1, 4, 4)
    # not standardized: values are the file's values
    assert torch.equal(torch.cat([s.train.x, s.val.x]).sort(0).values, x.sort(0).values)
    s5 = build_split(data_cfg(name="tensors", root=str(p), num_classes=5))
    assert s5.num_classes == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensors_half_precision_inputs_become_float32(tmp_path, dtype):
    x, y = _good_xy()
    s = build_split(data_cfg(name="tensors", root=str(_write_tensors(tmp_path, x.to(dtype), y))))
    assert s.train.x.dtype == torch.float32 and s.val.x.dtype == torch.float32
    nn.Linear(16, 3)(s.train.x.flatten(1))  # what the model will do with a batch


def test_tensors_float64_inputs_become_float32(tmp_path):
    x, y = _good_xy()
    s = build_split(data_cfg(name="tensors", root=str(_write_tensors(tmp_path, x.double(), y))))
    assert s.train.x.dtype == torch.float32


def test_tensors_nan_raises(tmp_path):
    x, y = _good_xy()
    x[7, 0, 1, 2] = float("nan")
    p = _write_tensors(tmp_path, x, y)
    with pytest.raises(DataError, match="NaN") as e:
        build_split(data_cfg(name="tensors", root=str(p)))
    assert "7" in str(e.value)  # names the offending sample


def test_tensors_inf_raises(tmp_path):
    x, y = _good_xy()
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match="inf"):
        build_split(data_cfg(name="tensors", root=str(_write_tensors(tmp_path, x, y))))


def test_tensors_negative_labels_raise(tmp_path):
    x, y = _good_xy()
    y[4] = -1
    with pytest.raises(DataError, match="out of range"):
        build_split(data_cfg(name="tensors", root=str(_write_tensors(tmp_path, x, y))))


def test_tensors_num_classes_too_small_raises(tmp_path):
    x, y = _good_xy()
    y[0] = 7
    p = _write_tensors(tmp_path, x, y)
    with pytest.raises(DataError, match="out of range") as e:
        build_split(data_cfg(name="tensors", root=str(p), num_classes=5))
    assert "7" in str(e.value)
    assert build_split(data_cfg(name="tensors", root=str(p), num_classes=8)).num_classes == 8


def test_tensors_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_split(data_cfg(name="tensors", root=str(tmp_path / "nope.pt")))


def test_tensors_bad_content_raises(tmp_path):
    p = tmp_path / "bad.pt"
    torch.save({"inputs": torch.zeros(3, 1, 2, 2)}, p)
    with pytest.raises(DataError):
        build_split(data_cfg(name="tensors", root=str(p)))
    x, y = _good_xy()
    with pytest.raises(DataError, match="N, C, H, W"):
        build_split(data_cfg(name="tensors", root=str(_write_tensors(tmp_path, x.flatten(1), y, "flat.pt"))))


def test_tensors_float_labels_raise(tmp_path):
    x, y = _good_xy()
    p = _write_tensors(tmp_path, x, y.float() + 0.5, "fy.pt")
    with pytest.raises(DataError, match="integer"):
        build_split(data_cfg(name="tensors", root=str(p)))


# ---------------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------------

def _make_images(folder: Path, counts, seed):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        d = folder / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(d / f"img{i}.png")


@pytest.fixture
def folder_split(tmp_path):
    root = tmp_path / "imgs_split"
    _make_images(root / "train", {"cat": 4, "dog": 3, "eel": 5}, seed=0)
    _make_images(root / "val", {"cat": 2, "dog": 2, "eel": 1}, seed=1)
    return root


@pytest.fixture
def folder_flat(tmp_path):
    root = tmp_path / "imgs_flat"
    _make_images(root, {"a": 5, "b": 5}, seed=2)
    return root


def _stream(split, seed=0, num_workers=0, bs=4):
    return BatchStream(split.train, bs, seed, shuffle=True, drop_last=False, num_workers=num_workers)


def _epoch(stream, epoch):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in stream.iter_epoch(epoch)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
                                    for (x1, y1, i1), (x2, y2, i2) in zip(a, b))


def test_imagefolder_with_train_val(folder_split):
    s = build_split(data_cfg(name="imagefolder", root=str(folder_split), image_size=8, augment=True))
    assert s.num_classes == 3 and s.input_shape == (3, 8, 8)
    assert len(s.train) == 12 and len(s.val) == 5
    assert Counter(s.train.y.tolist()) == {0: 4, 1: 3, 2: 5}
    assert Counter(s.val.y.tolist()) == {0: 2, 1: 2, 2: 1}
    x, y = s.train.load(0, 123)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    xv, _ = s.val.load(0, 123)
    assert xv.shape == (3, 8, 8)
    batches = _epoch(_stream(s), 0)
    assert [b[0].shape for b in batches] == [(4, 3, 8, 8)] * 3
    # labels follow the files
    for _, yb, ib in batches:
        assert yb.tolist() == [s.train.y[i].item() for i in ib]


def test_imagefolder_without_train_val(folder_flat):
    s = build_split(data_cfg(name="imagefolder", root=str(folder_flat), image_size=8, augment=True))
    assert s.num_classes == 2
    assert len(s.train) == 8 and len(s.val) == 2
    assert Counter(s.train.y.tolist() + s.val.y.tolist()) == {0: 5, 1: 5}
    assert not set(s.train.indices) & set(s.val.indices)
    again = build_split(data_cfg(name="imagefolder", root=str(folder_flat), image_size=8, augment=True))
    assert again.train.indices == s.train.indices and again.fingerprint == s.fingerprint
    other = build_split(data_cfg(name="imagefolder", root=str(folder_flat), image_size=8, split_seed=3))
    assert other.train.indices != s.train.indices or other.val.indices != s.val.indices
    assert s.train.load(1, 5)[0].shape == (3, 8, 8)


def test_imagefolder_augmentation_is_reproducible(folder_split):
    cfg = data_cfg(name="imagefolder", root=str(folder_split), image_size=8, augment=True)
    s = build_split(cfg)
    torch.manual_seed(0)
    e1 = _epoch(_stream(s, seed=7), 2)
    torch.manual_seed(1)  # the global RNG plays no part
    e2 = _epoch(_stream(build_split(cfg), seed=7), 2)
    assert _same(e1, e2)
    # the augmentation is really random: another epoch gives other images for the same samples
    e3 = _epoch(_stream(s, seed=7), 3)
    by_index = lambda ep: {int(i): x for xb, _, ib in ep for x, i in zip(xb, ib)}  # noqa: E731
    a, b = by_index(e1), by_index(e3)
    assert any(not torch.equal(a[i], b[i]) for i in a)
    # and without augment the same sample always gives the same tensor
    plain = build_split(data_cfg(name="imagefolder", root=str(folder_split), image_size=8, augment=False))
    assert torch.equal(plain.train.load(0, 1)[0], plain.train.load(0, 2)[0])
    assert not torch.equal(s.train.load(0, 1)[0], s.train.load(0, 2)[0]) or \
        not torch.equal(s.train.load(0, 3)[0], s.train.load(0, 4)[0])


def test_imagefolder_workers_give_same_batches(folder_split):
    s = build_split(data_cfg(name="imagefolder", root=str(folder_split), image_size=8, augment=True))
    e0 = _epoch(_stream(s, seed=3, num_workers=0), 1)
    e2 = _epoch(_stream(s, seed=3, num_workers=2), 1)
    assert _same(e0, e2)
    # resume mid-epoch with workers: the tail of the same epoch
    tail = [(x, y, i) for x, y, i in _stream(s, seed=3, num_workers=2).iter_epoch(1, start=1)]
    assert _same(e0[1:], tail)


def test_imagefolder_persistent_workers_give_same_batches(folder_split):
    """Workers kept alive across epochs (and a prefetch factor) change no batch: every epoch, a mid-epoch start
    and an epoch abandoned half-way (max_steps, a stop signal) give exactly the batches of num_workers=0."""
    s = build_split(data_cfg(name="imagefolder", root=str(folder_split), image_size=8, augment=True))
    ref = _stream(s, seed=3, num_workers=0)
    keep = BatchStream(s.train, 4, 3, shuffle=True, drop_last=False, num_workers=2, persistent_workers=True,
                       prefetch_factor=3)
    first = next(keep.iter_epoch(0))  # abandoned after one batch
    assert _same([tuple(t.clone() for t in first)], _epoch(ref, 0)[:1])
    for epoch in (0, 1, 2):
        assert _same(_epoch(keep, epoch), _epoch(ref, epoch))
    assert _same([tuple(t.clone() for t in b) for b in keep.iter_epoch(1, start=1)], _epoch(ref, 1)[1:])
    assert keep._loader is not None and keep._loader.persistent_workers  # one loader, reused by every epoch


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_split(data_cfg(name="imagefolder", root=str(tmp_path / "none")))


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _state(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state(),
            "trainer": {"step": 3, "epoch": 0, "batch_in_epoch": 3, "best": None}, "scaler": {}}


def _sha_file(d: Path) -> str:
    return (d / ck.DIGEST).read_text().split()[0]


def _eq(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def test_save_load_round_trip(tmp_path):
    state = _state()
    d, sha = ck.save(tmp_path, 3, state, {"seed": 0, "config": {"a": 1}}, keep_last=2)
    assert d == tmp_path / "checkpoints" / "step_000000003"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "state.pt", "state.pt.sha256"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    loaded, meta = ck.load(d)
    assert _eq(state, loaded)
    assert meta["step"] == 3 and meta["sha256"] == sha and meta["seed"] == 0 and meta["config"] == {"a": 1}
    assert meta["state_bytes"] == (d / ck.STATE).stat().st_size
    # the loaded state drives a model
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    m.load_state_dict(loaded["model"])


def test_sha256_file_matches_content(tmp_path):
    d, sha = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    actual = hashlib.sha256((d / ck.STATE).read_bytes()).hexdigest()
    assert _sha_file(d) == actual == sha
    meta_sha = hashlib.sha256((d / ck.META).read_bytes()).hexdigest()
    assert (d / ck.DIGEST).read_text() == f"{actual}  state.pt\n{meta_sha}  meta.json\n"  # sha256sum -c format
    assert json.loads((d / ck.META).read_text())["sha256"] == actual


def test_latest_points_to_newest_and_retention(tmp_path):
    metrics = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2, 5: 0.3}
    for step, m in metrics.items():
        d, _ = ck.save(tmp_path, step, _state(step), {}, keep_last=2, metric=m, mode="max")
        assert ck.read_pointer(tmp_path, "latest") == d
        assert ck.is_latest(d)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_000000002", "step_000000004", "step_000000005"]
    assert ck.read_pointer(tmp_path, "best").name == "step_000000002"
    assert ck.read_pointer(tmp_path, "latest").name == "step_000000005"
    assert not ck.is_latest(tmp_path / "checkpoints" / "step_000000004")


def test_retention_min_mode_and_no_best(tmp_path):
    for step, m in {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.2}.items():
        ck.save(tmp_path, step, _state(step), {}, keep_last=1, metric=m, mode="min")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000000003", "step_000000004"]
    other = tmp_path / "other"
    for step in (1, 2, 3):
        ck.save(other, step, _state(step), {}, keep_last=2, metric=float(step), keep_best=False)
    assert [p.name for p in ck.list_checkpoints(other)] == ["step_000000002", "step_000000003"]
    assert ck.read_pointer(other, "best") is None


@pytest.mark.parametrize("mode,values", [("max", [float("nan"), 0.5, 0.9]), ("min", [float("nan"), 2.0, 1.0])])
def test_nan_metric_does_not_stay_best(tmp_path, mode, values):
    for step, v in enumerate(values, start=1):
        ck.save(tmp_path, step, {"step": step}, {}, keep_last=1, metric=v, mode=mode)
    assert ck.read_pointer(tmp_path, "best").name == "step_000000003"


def test_same_step_saved_again_replaces(tmp_path):
    ck.save(tmp_path, 4, _state(0), {}, keep_last=2)
    d, sha = ck.save(tmp_path, 4, _state(1), {}, keep_last=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_000000004"]
    st, meta = ck.load(d)
    assert meta["sha256"] == sha
    assert _eq(st["model"], _state(1)["model"])


def test_bit_flip_detected(tmp_path):
    d, _ = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    data = bytearray((d / ck.STATE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / ck.STATE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA256"):
        ck.load(d)
    # the state.pt.sha256 check alone catches it (meta.json without its own digest)
    meta = json.loads((d / ck.META).read_text())
    del meta["sha256"]
    (d / ck.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="SHA256"):
        ck.load(d)


def test_truncated_file_detected(tmp_path):
    d, _ = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    data = (d / ck.STATE).read_bytes()
    (d / ck.STATE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="SHA256"):
        ck.load(d)


def test_missing_digest_detected(tmp_path):
    d, _ = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    (d / ck.DIGEST).unlink()
    with pytest.raises(CheckpointError, match="sha256"):
        ck.load(d)


def test_meta_digest_mismatch_detected(tmp_path):
    """Replacing state.pt and its .sha256 but not meta.json is caught too."""
    d, _ = ck.save(tmp_path, 1, _state(0), {}, keep_last=2)
    other, _ = ck.save(tmp_path / "b", 1, _state(1), {}, keep_last=2)
    (d / ck.STATE).write_bytes((other / ck.STATE).read_bytes())
    (d / ck.DIGEST).write_text((other / ck.DIGEST).read_text())
    with pytest.raises(CheckpointError, match="SHA256"):
        ck.load(d)


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    d, _ = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"model": _Evil()}, buf)  # a real torch zip checkpoint whose pickle calls os.system
    payload = buf.getvalue()
    # sanity: this payload really would run the command with weights_only=False
    probe = tmp_path / "probe.pt"
    _Evil.marker = str(tmp_path / "probe_ran")
    torch.save({"model": _Evil()}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_ran").exists()

    (d / ck.STATE).write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (d / ck.DIGEST).write_text(f"{sha}  state.pt\n")
    meta = json.loads((d / ck.META).read_text())
    meta["sha256"] = sha
    (d / ck.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_only"):
        ck.load(d)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    """A bare (non-zip) pickle that calls os.system is refused as well."""
    d, _ = ck.save(tmp_path, 1, _state(), {}, keep_last=2)
    marker = tmp_path / "pwned2"
    _Evil.marker = str(marker)
    payload = pickle.dumps({"model": _Evil()}, protocol=2)
    (d / ck.STATE).write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (d / ck.DIGEST).write_text(f"{sha}  state.pt\n")
    meta = json.loads((d / ck.META).read_text())
    meta["sha256"] = sha
    (d / ck.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        ck.load(d)
    assert not marker.exists()


def test_candidates_latest_picks_newest_run(tmp_path):
    root = tmp_path / "runs"
    ck.save(root / "a", 1, _state(), {}, keep_last=2)
    ck.save(root / "a", 2, _state(), {}, keep_last=2)
    time.sleep(0.05)
    b2, _ = ck.save(root / "b", 2, _state(), {}, keep_last=2)
    (root / "empty").mkdir()
    assert ck.candidates("latest", root) == [b2]
    time.sleep(0.05)
    a3, _ = ck.save(root / "a", 3, _state(), {}, keep_last=2)
    assert ck.candidates("latest", root)[0] == a3
    assert ck.candidates("latest", root, run_name="b") == [b2]
    # a run directory: latest first, then the older ones, newest first
    assert [p.name for p in ck.candidates(str(root / "a"), root)] == ["step_000000003", "step_000000002"]
    # a checkpoint directory: itself
    assert ck.candidates(str(b2), root) == [b2]
    assert ck.run_dir_of(a3) == (root / "a").resolve()


def test_candidates_missing(tmp_path):
    with pytest.raises(CheckpointError):
        ck.candidates(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(CheckpointError, match="latest"):
        ck.candidates("latest", tmp_path / "no_runs_here")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(CheckpointError):
        ck.candidates("latest", tmp_path / "runs")


def test_load_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ck.load(tmp_path / "checkpoints" / "step_000000001")


def test_equal_states_hash_equal(tmp_path):
    a = ck.save(tmp_path / "r1", 5, _state(0), {"time": 1}, keep_last=2)[1]
    b = ck.save(tmp_path / "r2", 5, _state(0), {"time": 2}, keep_last=2)[1]
    assert a == b
    c = ck.save(tmp_path / "r3", 5, _state(1), {}, keep_last=2)[1]
    assert c != a


def _fresh_mixed_state():
    """What a fresh run holds: every "lr"/"name" key below is the same (interned literal) str object."""
    return {"optimizer": {"param_groups": [{"lr": 0.1, "name": "decay", "params": [0]}]},
            "extra": {"lr": 0.1, "name": "decay"},
            "w": torch.arange(4.0)}


def test_loaded_keys_hash_like_literals(tmp_path):
    fresh = _fresh_mixed_state()
    buf = io.BytesIO()
    torch.save(fresh, buf)
    buf.seek(0)
    loaded_opt = torch.load(buf, weights_only=True)["optimizer"]
    # a resumed run: the optimizer part came from torch.load, the rest from literals
    resumed = {"optimizer": loaded_opt, "extra": {"lr": 0.1, "name": "decay"}, "w": torch.arange(4.0)}
    k_loaded = next(iter(loaded_opt["param_groups"][0]))
    k_literal = next(iter(resumed["extra"]))
    assert k_loaded == k_literal and k_loaded is not k_literal  # equal values, different objects

    def raw_bytes(obj):
        b = io.BytesIO()
        torch.save(obj, b)
        return b.getvalue()

    # precondition: plain torch.save would hash these equal states differently
    assert raw_bytes(fresh) != raw_bytes(resumed)
    sha_fresh = ck.save(tmp_path / "fresh", 1, fresh, {}, keep_last=1)[1]
    sha_resumed = ck.save(tmp_path / "resumed", 1, resumed, {}, keep_last=1)[1]
    assert sha_fresh == sha_resumed


def test_full_state_round_trip_hash_stable(tmp_path):
    """Save, load, save again: the same bytes (the resume path of an unchanged state)."""
    d1, sha1 = ck.save(tmp_path / "r1", 1, _state(0), {}, keep_last=1)
    loaded, _ = ck.load(d1)
    loaded["trainer"] = {"step": 3, "epoch": 0, "batch_in_epoch": 3, "best": None}  # rebuilt from literals
    _, sha2 = ck.save(tmp_path / "r2", 1, loaded, {}, keep_last=1)
    assert sha1 == sha2


def test_imagefolder_through_the_cli_workers_do_not_change_training(folder_split, tmp_path):
    """Persistent DataLoader workers (the default with num_workers > 0) train bitwise like no workers, across
    epochs, and a stop + resume in the middle lands on the same checkpoint. Dropout makes the global RNG stream
    matter: DataLoader iterators must not draw from it (they used to, once per epoch and per resume)."""
    from conftest import FAST, run_cli, sha_of

    common = ["data=imagefolder", f"data.root={folder_split}", "data.image_size=12", "data.batch_size=4",
              "data.augment=true", "model=cnn", "model.dropout=0.2", "trainer.epochs=3", *FAST]
    run_cli(tmp_path, *common, "data.num_workers=0", "run_name=w0")
    run_cli(tmp_path, *common, "data.num_workers=2", "run_name=w2", "trainer.stop_at_step=4")
    run_cli(tmp_path, "resume=runs/w2", *FAST)
    assert sha_of(tmp_path / "runs/w2", 9) == sha_of(tmp_path / "runs/w0", 9)
