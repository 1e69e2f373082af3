"""task=causal_lm: the token-averaged loss against a hand computation, and the loop's step normalisation — the mean
over every counted token of the step, whatever the split into micro-batches (gradient accumulation) or ranks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from omegaconf import OmegaConf

from trainrun.config import PrecisionConfig, TaskConfig
from trainrun.data import BatchStream, TensorSet
from trainrun.loop import Trainer, micro_batches, train_step
from trainrun.precision import PrecisionPolicy
from trainrun.tasks.causal_lm import CausalLM

V, T = 11, 6


def _task(ignore_index=-100):
    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), {"name": "causal_lm", "ignore_index": ignore_index})
    return CausalLM(cfg, nn.Identity(), (T, V))


def test_loss_is_the_mean_over_counted_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, T, V, generator=g)
    target = torch.randint(0, V, (3, T), generator=g)
    target[0, :4] = -100  # a masked prompt
    target[2, 5] = -100
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[i, j, target[i, j]] for i in range(3) for j in range(T) if target[i, j] != -100]
    want = torch.stack(picked).sum() / len(picked)
    task = _task()
    assert torch.allclose(task.loss(logits, target), want, atol=1e-6)
    assert int(task.counted_tokens(target)) == len(picked) == 3 * T - 5
    sums = task.eval_sums(logits, target)
    metrics = task.eval_metrics(sums, 3)
    assert metrics["val/loss"] == pytest.approx(float(want), rel=1e-6)
    assert metrics["val/ppl"] == pytest.approx(float(torch.exp(want)), rel=1e-6)


def test_custom_ignore_index_and_bad_targets():
    task = _task(ignore_index=0)
    y = torch.tensor([[0, 0, 3, 4, 5, 6]])
    assert int(task.counted_tokens(y)) == 4
    with pytest.raises(Exception, match="token ids span"):
        task.check_targets(torch.tensor([[1, 2, V]]), "data train split")
    with pytest.raises(Exception, match="nothing to learn"):
        task.check_targets(torch.zeros(2, T, dtype=torch.long), "data train split")
    with pytest.raises(Exception, match="integer token blocks"):
        task.check_targets(torch.zeros(2, T), "data train split")


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


class _Constant:
    def apply(self, optimizer, step):
        return 1.0


def _masked_blocks(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (n, T), generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    y[[0, 1, 2, 4], : T - 1] = -100  # blocks counting 1 token: micro-batches and ranks count unequal totals
    return TensorSet(x, y)


def _grads_after_one_step(batch, accumulation, rank=0, world=1, model=None):
    ds = _masked_blocks()
    model = model or _TinyLM()
    prec = PrecisionPolicy(OmegaConf.structured(PrecisionConfig), torch.device("cpu"))
    stream = BatchStream(ds, batch, seed=0, shuffle=False, drop_last=True, rank=rank, world=world)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), _Constant(), prec, nn.Identity(), stream,
                stream, torch.device("cpu"), total_steps=1, accumulation=accumulation, world=world, task=_task())
    out = train_step(t, micro_batches(t), want_norm=False)
    net = model.module if hasattr(model, "module") else model
    return [p.grad.clone() for p in net.parameters()], out["loss"]


def _reference():
    model, ds, task = _TinyLM(), _masked_blocks(), _task()
    loss = task.loss(model(ds.x), ds.y)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], loss.detach()


def test_accumulation_gives_the_full_batch_token_mean():
    want_grads, want_loss = _reference()
    for batch, acc in ((8, 1), (4, 2), (2, 4)):
        grads, loss = _grads_after_one_step(batch, acc)
        assert torch.allclose(loss, want_loss, atol=1e-6), (batch, acc)
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g, w, atol=1e-6), (batch, acc)
    # the known mistake (mean per micro-batch, then over micro-batches) gives other gradients: the test can fail
    model, ds, task = _TinyLM(), _masked_blocks(), _task()
    (sum(task.loss(model(ds.x[i:i + 4]), ds.y[i:i + 4]) for i in (0, 4)) / 2).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([w.flatten() for w in want_grads])
    assert (naive - want).norm() > 0.1 * want.norm()


def _rank_main(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_TinyLM())
        grads, _ = _grads_after_one_step(2, 2, rank=rank, world=2, model=model)
        out[rank] = [g.tolist() for g in grads]
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_full_batch_token_mean():
    """2 gloo ranks x 2 micro-batches of 2 blocks (rank 0 gets the heavily masked blocks first): DDP's averaged
    gradients equal one process's over the 8 blocks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(port, out), nprocs=2, join=True)
        got = {r: [torch.tensor(g) for g in out[r]] for r in range(2)}
    want, _ = _reference()
    for r in range(2):
        for g, w in zip(got[r], want):
            assert torch.allclose(g, w, atol=1e-6)
