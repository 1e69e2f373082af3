"""Repeated augmentation (data.ra_reps, trainrun/data/sampler.py): torchvision's RASampler semantics, rank
disjointness, worker-count and mid-epoch-resume exactness, a different augmentation per copy, and one CLI run
stopped and resumed bit for bit."""
import math
from collections import Counter

import pytest
import torch

from conftest import sha_of, structured
from trainrun.config import DataConfig
from trainrun.data import BatchStream, build_split
from trainrun.data.loader import sample_seed
from trainrun.data.sampler import ra_order, repeated_order
from trainrun.errors import ConfigError
from trainrun.seed import data_order_generator


def data_cfg(**kw):
    return structured(DataConfig, **kw)


@pytest.fixture(scope="module")
def digits():
    return build_split(data_cfg(augment=True, policy="trivialaugment", ra_reps=3, limit_train=320))


def torchvision_ra_sampler(n, reps, world, rank, seed, epoch, num_selected):
    """torchvision references/classification/sampler.py RASampler.__iter__, with the epoch's permutation drawn from
    trainrun's (seed, epoch) generator and `num_selected_samples` handed in (torchvision: n // 256 * 256 / world)."""
    num_samples = int(math.ceil(n * float(reps) / world))
    total_size = num_samples * world
    indices = torch.randperm(n, generator=data_order_generator(seed, epoch)).tolist()
    indices = [ele for ele in indices for _ in range(reps)]
    indices += indices[: (total_size - len(indices))]
    indices = indices[rank:total_size:world]
    return indices[:num_selected]


def _rank_stream(ds, bs, world, rank, seed=5, reps=3):
    return BatchStream(ds, bs, seed, shuffle=True, drop_last=True, rank=rank, world=world, ra_reps=reps)


@pytest.mark.parametrize("world,reps", [(1, 3), (2, 3), (4, 2), (3, 4)])
def test_ranks_read_what_torchvisions_ra_sampler_gives(digits, world, reps):
    n, bs = len(digits.train), 16
    streams = [_rank_stream(digits.train, bs, world, r, reps=reps) for r in range(world)]
    per_rank = streams[0].batches_per_epoch * bs  # the plain epoch's share: n // (bs * world) whole batches
    for r, stream in enumerate(streams):
        got = torch.cat(stream.batch_indices(2)).tolist()
        assert got == torchvision_ra_sampler(n, reps, world, r, 5, 2, per_rank)
    # every position of a global batch is read by exactly one rank, and a global batch is the same samples
    # whatever the world size (a contiguous stretch of the repeated order)
    order, _ = ra_order(n, reps, 5, 2)
    one = _rank_stream(digits.train, bs * world, 1, 0, reps=reps).batch_indices(2)
    for b in range(streams[0].batches_per_epoch):
        parts = [s.batch_indices(2, b)[0] for s in streams]
        assert Counter(torch.cat(parts).tolist()) == Counter(order[b * bs * world:(b + 1) * bs * world].tolist())
        assert Counter(torch.cat(parts).tolist()) == Counter(one[b].tolist())
        if reps <= world:  # the copies of a sample land on different ranks
            for p in parts:
                assert len(set(p.tolist())) == len(p)


def test_each_index_repeats_k_times_in_a_row_before_selection():
    idx, copies = repeated_order(50, 4, seed=1, epoch=3)
    assert Counter(idx.tolist()) == {i: 4 for i in range(50)}
    assert torch.equal(idx.view(50, 4), idx[::4, None].expand(50, 4))  # k consecutive copies
    assert torch.equal(copies, torch.arange(200) % 4)
    assert torch.equal(idx[::4], torch.randperm(50, generator=data_order_generator(1, 3)))  # the plain permutation
    cut, cut_copies = ra_order(50, 4, 1, 3)
    assert torch.equal(cut, idx[:50]) and torch.equal(cut_copies, copies[:50])
    assert not torch.equal(ra_order(50, 4, 1, 4)[0], cut)  # another epoch, another order


def test_ra_reps_1_is_todays_order_bit_for_bit(digits):
    """ra_reps=1: the plain shuffle, rank r's contiguous slice, seeds sample_seed(seed, epoch, index)."""
    for world, rank in ((1, 0), (2, 1)):
        stream = _rank_stream(digits.train, 8, world, rank, reps=1)
        order = torch.randperm(len(digits.train), generator=data_order_generator(5, 1))
        expected = [order[b * 8 * world + rank * 8:b * 8 * world + rank * 8 + 8]
                    for b in range(stream.batches_per_epoch)]
        keys = stream.batch_keys(1)
        assert all(torch.equal(i, e) for (i, _), e in zip(keys, expected)) and len(keys) == len(expected)
        assert keys[3][1] == [sample_seed(5, 1, int(i)) for i in expected[3]]


def test_every_copy_is_augmented_differently(digits):
    stream = _rank_stream(digits.train, 30, 1, 0, reps=3)
    (idx, seeds), = stream.batch_keys(0, 0, seeds=True)[:1]
    x, _, same_idx = next(stream.iter_epoch(0))
    assert torch.equal(idx, same_idx) and len(set(seeds)) == len(seeds)  # a seed per copy
    assert seeds[0] == sample_seed(5, 0, int(idx[0]))  # the first copy keeps the sample's plain seed
    groups = [list(range(k, k + 3)) for k in range(0, 30, 3)]
    assert all(len(set(idx[g].tolist())) == 1 for g in groups)  # 10 samples, 3 copies each, in a row
    differ = sum(not torch.equal(x[a], x[b]) for g in groups for a, b in ((g[0], g[1]), (g[1], g[2]), (g[0], g[2])))
    assert differ >= 27, differ  # of 30 pairs: TrivialAugment's identity op and the 9 crops can coincide


def test_mid_epoch_resume_and_stream_rebuild_are_exact(digits):
    """Iterate an epoch, stop at batch j, rebuild the stream from (epoch, j) - the state a checkpoint keeps - with
    the global RNG disturbed in between: the rest of the epoch is the same, bit for bit."""
    full = [(x.clone(), y.clone(), i.clone()) for x, y, i in _rank_stream(digits.train, 32, 2, 1).iter_epoch(4)]
    torch.manual_seed(77)
    torch.rand(3)
    j = 3
    rest = list(_rank_stream(digits.train, 32, 2, 1).iter_epoch(4, j))
    assert len(rest) == len(full) - j
    for (x1, y1, i1), (x2, y2, i2) in zip(full[j:], rest):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)


def test_the_training_split_carries_ra_reps_and_eval_streams_ignore_it(digits):
    assert digits.train.ra_reps == 3 and BatchStream(digits.train, 8, 0, shuffle=True, drop_last=True).ra_reps == 3
    assert BatchStream(digits.val, 8, 0, shuffle=False, drop_last=False).ra_reps == 1
    assert BatchStream(digits.train, 8, 0, shuffle=False, drop_last=False).ra_reps == 1
    plain = BatchStream(digits.train, 8, 0, shuffle=True, drop_last=True, ra_reps=1)
    assert plain.batches_per_epoch == BatchStream(digits.train, 8, 0, shuffle=True, drop_last=True).batches_per_epoch


def test_a_curriculum_with_ra_reps_is_refused(digits):
    stream = BatchStream(digits.train, 8, 0, shuffle=True, drop_last=True)
    with pytest.raises(ConfigError, match=r"^data.ra_reps=3 with a curriculum: .*curriculum.name=off"):
        stream.order_fn = lambda epoch: torch.arange(len(digits.train))


def test_image_files_with_workers_give_the_same_ra_batches(tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), "RGB").save(tmp_path / cls / f"{i}.png")
    split = build_split(data_cfg(name="imagefolder", root=str(tmp_path), image_size=8, augment=True,
                                 policy="randaugment", ra_reps=2, val_fraction=0.25))
    runs = [list(BatchStream(split.train, 4, 9, shuffle=True, drop_last=True, num_workers=w).iter_epoch(1))
            for w in (0, 2)]
    assert len(runs[0]) == 2
    for (x1, y1, i1), (x2, y2, i2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
        assert i1[0] == i1[1] and not torch.equal(x1[0], x1[1])  # two copies, two views


def test_trivialaugment_ra_run_resumes_bit_for_bit(cli):
    args = ["data.augment=true", "data.policy=trivialaugment", "data.ra_reps=2", "model=mlp", "trainer.max_steps=4",
            "trainer.ckpt_every=2", "data.batch_size=32"]
    p = cli(*args, "run_name=full")
    assert "TrivialAugmentWide" in p.stdout
    cli(*args, "run_name=cut", "trainer.stop_at_step=3")
    cli("resume=runs/cut", *args)
    assert sha_of(cli.dir / "runs" / "full", 4) == sha_of(cli.dir / "runs" / "cut", 4)
