"""Runner overhead: trainrun's training loop vs a minimal hand-written PyTorch loop vs PyTorch Lightning.

The same model object construction (`trainrun.models.build_model`, seeded like trainrun seeds it), the same
optimizer construction (`trainrun.optim.build_optimizer`: AdamW, trainrun's parameter groups), the same batch
size, the same in-memory tensors visited in the same random order (trainrun's `randperm(seed, epoch)`), the
same fp32 loss, and the same number of steps, run three ways:

  trainrun   `trainrun.runner.run(cfg, run_dir)` in-process with a config composed by Hydra's compose API
             (defaults + `optimizer=adamw schedule=constant`), logging at trainrun's default interval
             (`logger.log_every=10`, plain lines: stdout is not a terminal here); eval and checkpoint happen only
             after the last measured step (`trainer.eval_every = trainer.ckpt_every = max_steps`).
  hand       zero_grad -> forward (autocast for bf16) -> cross-entropy -> backward -> step over the same tensors,
             no per-step .item().
  lightning  `lightning.Trainer` with its defaults (progress bar, CSV logger at log_every_n_steps=10,
             `self.log("train_loss", loss)` per step) except checkpointing off and no validation.

The measured window is `--steps` optimizer steps after `--warmup` steps, timed from per-step timestamps
(trainrun: the logger's per-step `advance`/`log` calls; Lightning: an `on_train_batch_end` callback), so model
building, Hydra, the final eval and the checkpoint are outside it. Repetitions are interleaved
(trainrun hand lightning trainrun hand lightning ...); ratios are taken within each repetition and the median
and min-max over repetitions are reported. After each run the final validation loss of the trained model is
recorded: the three runners train the same trajectory, so it must agree (a check that they do the same work).

    python scripts/bench_overhead.py              # full run (~4-5 min on a 2-core CPU)
    python scripts/bench_overhead.py --quick      # smoke run (<30 s), JSON to the temp dir
    python scripts/bench_overhead.py --count      # per-step ATen ops and Python calls (~1 min): load-independent

--count measures what a step does instead of how long it takes: the ATen operators dispatched (a TorchDispatchMode
counts them) and the Python calls and C calls made (sys.setprofile), per optimizer step, for the hand loop and for
trainrun's `fit` on the same model, optimizer and data (built by trainrun.build; no logger, eval or checkpoint in
the window). Timings on a shared machine move by 10-30% with the load; these counts do not move at all.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name -> trainrun overrides, batch size, (warmup, measured steps), quick (batch, warmup, steps)
CONFIGS: Dict[str, Dict[str, Any]] = {
    "mlp_digits": {"overrides": ["data=digits", "model=mlp"], "batch": 64, "warmup": 50, "steps": 1000,
                   "quick": (64, 10, 60)},
    "resnet18_32px": {"overrides": ["data=synthetic", "data.input_shape=[3,32,32]", "model=resnet18"],
                      "batch": 16, "warmup": 2, "steps": 10, "quick": (8, 1, 2)},
}
PRECISIONS = ("fp32", "bf16")
RUNNERS = ("trainrun", "hand", "lightning")
# --ablate: trainrun with one cost after another switched off (attributes its overhead), and Lightning without its
# progress bar. name -> (runner, extra trainrun overrides or Lightning options, environment during the run)
VARIANTS: Dict[str, Any] = {
    "trainrun": ("trainrun", [], {}),
    "hand": ("hand", [], {}),
    "lightning": ("lightning", {}, {}),
    # rich's live progress bar as a terminal user gets it (FORCE_COLOR makes rich render as on a terminal)
    "trainrun_bar": ("trainrun", ["logger.progress=bar"], {"FORCE_COLOR": "1"}),
    "trainrun_noguard": ("trainrun", ["doctor.nan_guard=off"], {}),
    "trainrun_noguard_quiet": ("trainrun", ["doctor.nan_guard=off", "logger.progress=off"], {}),
    # no log step inside the window at all (the one at the last step is the window's end)
    "trainrun_noguard_nolog": ("trainrun", ["doctor.nan_guard=off", "logger.progress=off",
                                            "logger.log_every=100000000"], {}),
    "lightning_nobar": ("lightning", {"enable_progress_bar": False}, {}),
    # the NaN guard's verdict read one step late (the CUDA default; on CPU it adds the pre-update copy)
    "trainrun_deferred": ("trainrun", ["doctor.guard_sync=deferred"], {}),
}
ABLATE = ("trainrun", "trainrun_bar", "trainrun_noguard", "trainrun_noguard_quiet", "trainrun_noguard_nolog", "hand",
          "lightning", "lightning_nobar")


# ---------------------------------------------------------------------------------------------------- config

_SETUP = False


def compose(overrides: List[str]):
    global _SETUP
    from hydra import compose as hcompose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    if not _SETUP:
        setup()
        _SETUP = True
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="bench_overhead"):
        return hcompose("config", overrides=overrides)


def trainrun_overrides(spec: Dict[str, Any], precision: str, batch: int, total: int) -> List[str]:
    return [*spec["overrides"], "optimizer=adamw", "schedule=constant", f"precision={precision}",
            f"data.batch_size={batch}", f"trainer.max_steps={total}", f"trainer.eval_every={total}",
            f"trainer.ckpt_every={total}", "trainer.device=cpu", "data.limit_val=64", "logger.plots=false",
            "seed=0"]


# ---------------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def silenced():
    """stdout/stderr to /dev/null while a runner trains (its console lines and bars still get written)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def stamp() -> Tuple[float, float]:
    """(wall clock, CPU time of the whole process): CPU seconds do not count the time other processes on this
    shared machine hold the cores, so they are the steadier measure of the work a runner does."""
    return time.perf_counter(), time.process_time()


def window(marks: List, warmup: int, steps: int, block: int = 10) -> Dict[str, float]:
    """Wall and CPU seconds between the timestamps of step `warmup` and step `warmup + steps`, and the median wall
    seconds per step over consecutive `block`-step blocks of that window. Each block holds one log step (trainrun's
    and Lightning's log_every is 10), so the block median keeps the logging cost and drops the bursts a shared
    machine adds to some blocks, which move the whole-window figure by 10-30%."""
    at = {step: t for step, t in marks}
    if warmup not in at or warmup + steps not in at:
        raise RuntimeError(f"missing step timestamps (have steps {sorted(at)[:3]}..{sorted(at)[-3:]}); "
                           "did trainrun's logger interface change?")
    (w0, c0), (w1, c1) = at[warmup], at[warmup + steps]
    blocks = [(at[b + block][0] - at[b][0]) / block for b in range(warmup, warmup + steps - block + 1, block)
              if b in at and b + block in at]
    return {"seconds": w1 - w0, "cpu_seconds": c1 - c0,
            "block_s_per_step": statistics.median(blocks) if blocks else (w1 - w0) / steps}


def val_loss(model, cfg, split) -> float:
    from trainrun.data import BatchStream
    from trainrun.loop import evaluate
    from trainrun.precision import PrecisionPolicy

    val = BatchStream(split.val, cfg.data.eval_batch_size, cfg.seed, shuffle=False, drop_last=False)
    return evaluate(model, val, PrecisionPolicy(cfg.precision, torch.device("cpu")), torch.device("cpu"))["val/loss"]


def fresh_model_and_optimizer(cfg, split):
    """The model and optimizer exactly as trainrun.build builds them (seed_everything, build_model, default init)."""
    from trainrun.models import build_model
    from trainrun.optim import build_optimizer
    from trainrun.regularization import effective_dropout
    from trainrun.seed import seed_everything

    seed_everything(cfg.seed)
    model = build_model(cfg.model, split.input_shape, split.num_classes, effective_dropout(cfg.regularization, cfg.model))
    return model, build_optimizer(model, cfg.optimizer, cfg.data.batch_size)


def epoch_batches(n: int, batch: int, seed: int, epoch: int):
    """trainrun's data order: randperm(n) from the (seed, epoch) generator, full batches only."""
    from trainrun.seed import data_order_generator

    order = torch.randperm(n, generator=data_order_generator(seed, epoch))
    return [order[b * batch:(b + 1) * batch] for b in range(n // batch)]


# ---------------------------------------------------------------------------------------------------- runners

def run_trainrun(cfg, split, warmup: int, steps: int) -> Dict[str, Any]:
    import trainrun.modes.session as session
    import trainrun.runner as runner
    from trainrun.logging import RunLogger

    marks: List = []

    class TimedLogger(RunLogger):  # one perf_counter per step: at advance(step) or log(step, train metrics)
        def advance(self, step):
            marks.append((step, stamp()))
            super().advance(step)

        def log(self, step, metrics):
            if "train/loss" in metrics:
                marks.append((step, stamp()))
            super().log(step, metrics)

    with tempfile.TemporaryDirectory(prefix="bench-trainrun-") as d:
        orig, session.RunLogger = session.RunLogger, TimedLogger  # the train mode's session opens the logger
        try:
            run_dir = Path(d) / "run"
            run_dir.mkdir()  # Hydra creates it before calling the task
            with silenced():
                final = runner.run(cfg, run_dir)
        finally:
            session.RunLogger = orig
    return {**window(marks, warmup, steps), "val_loss": final.get("val/loss")}


def run_hand(cfg, split, warmup: int, steps: int) -> Dict[str, Any]:
    model, opt = fresh_model_and_optimizer(cfg, split)
    timing = hand_loop(model, opt, cfg, split, warmup, steps, lambda logits, y: F.cross_entropy(logits.float(), y))
    return {**timing, "val_loss": val_loss(model, cfg, split)}


def hand_loop(model, opt, cfg, split, warmup: int, steps: int, loss_of) -> Dict[str, float]:
    """The minimal hand-written loop (also bench_lm's nanoGPT-style one): the same epoch orders as trainrun, autocast
    for bf16, loss_of(logits, y), backward, step. Times the steps after `warmup` (see `window`)."""
    x_all, y_all = split.train.x, split.train.y
    batch, seed, total = cfg.data.batch_size, cfg.seed, warmup + steps
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.precision.name == "bf16" \
        else contextlib.nullcontext
    model.train()
    step, epoch, marks = 0, 0, []
    while step < total:
        for idx in epoch_batches(len(y_all), batch, seed, epoch):
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = model(x)
            loss_of(logits, y).backward()
            opt.step()
            step += 1
            if step >= warmup:  # a timestamp per step, as the other runners take them
                marks.append((step, stamp()))
            if step == total:
                break
        epoch += 1
    return window(marks, warmup, steps)


def run_lightning(cfg, split, warmup: int, steps: int, **trainer_kw) -> Dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    model, _ = fresh_model_and_optimizer(cfg, split)
    batch, seed = cfg.data.batch_size, cfg.seed
    opt_cfg = cfg.optimizer

    class OrderSampler(Sampler):
        """Yields trainrun's index batches; with batch_size=None the TensorDataset gathers x[idx], y[idx]."""

        def __init__(self, n: int):
            self.n, self.epoch = n, 0

        def __len__(self):
            return self.n // batch

        def __iter__(self):
            batches = epoch_batches(self.n, batch, seed, self.epoch)
            self.epoch += 1
            return iter(batches)

    class Lit(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, b, batch_idx):
            x, y = b
            loss = F.cross_entropy(self.net(x).float(), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            from trainrun.optim import build_optimizer

            return build_optimizer(self.net, opt_cfg, batch)

    marks: List = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            marks.append((trainer.global_step, stamp()))

    ds = TensorDataset(split.train.x, split.train.y)
    loader = DataLoader(ds, batch_size=None, sampler=OrderSampler(len(ds)))
    lit = Lit(model)
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as d, silenced():
        trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1,
                            precision="bf16-mixed" if cfg.precision.name == "bf16" else "32-true",
                            log_every_n_steps=10, enable_checkpointing=False, enable_model_summary=False,
                            logger=CSVLogger(d), default_root_dir=d, callbacks=[Timer()],
                            use_distributed_sampler=False, **trainer_kw)
        trainer.fit(lit, train_dataloaders=loader)
    return {**window(marks, warmup, steps), "val_loss": val_loss(model, cfg, split)}


RUN = {"trainrun": run_trainrun, "hand": run_hand, "lightning": run_lightning}


@contextlib.contextmanager
def env(extra: Dict[str, str]):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OpCounter:
    """Counts the ATen operators dispatched while active (a TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = 0, Mode()


def count_per_step(fn, steps: int) -> Dict[str, float]:
    """ATen ops and Python-level calls (Python functions + C functions called from Python) per step of fn(steps)."""
    counter = _OpCounter()
    with counter.mode:
        fn(steps)
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        fn(steps)
    finally:
        sys.setprofile(None)
    return {"aten_ops": counter.ops / steps, "python_calls": calls[0] / steps}


def count_loops(cfg, steps: int) -> Dict[str, Dict[str, float]]:
    """The per-step counts of the hand loop and of trainrun's fit (guard step / deferred / off) on one model."""
    from trainrun import loop
    from trainrun.build import build

    with tempfile.TemporaryDirectory(prefix="bench-count-") as d, silenced():
        run = build(cfg, Path(d))
    t, doctor = run.trainer, run.trainer.doctor
    x_all, y_all, batch = t.train.ds.x, t.train.ds.y, cfg.data.batch_size
    order = epoch_batches(len(y_all), batch, cfg.seed, 0)
    autocast = t.precision.autocast

    def hand(n):
        for i in range(n):
            idx = order[i % len(order)]
            x, y = x_all[idx], y_all[idx]
            t.optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = t.model(x)
            F.cross_entropy(logits.float(), y).backward()
            t.optimizer.step()

    def trainrun_fit(sync: Optional[str]):
        def fn(n):
            t.doctor = doctor if sync else None
            if doctor is not None and sync:
                doctor.deferred, doctor._on_host = sync == "deferred", None
            t.state.step = 0
            loop.fit(t, log_every=cfg.logger.log_every, eval_every=10 ** 9, ckpt_every=10 ** 9, stop_at=n,
                     log=lambda s, m: None, on_eval=lambda m: None, save=lambda: None, advance=lambda s: None,
                     should_stop=lambda: False)
        return fn

    variants = {"hand": hand, "trainrun (guard, step)": trainrun_fit("step"),
                "trainrun (guard, deferred)": trainrun_fit("deferred"), "trainrun (no guard)": trainrun_fit(None)}
    out = {}
    for name, fn in variants.items():
        fn(5)  # optimizer state, lazily built lists
        out[name] = count_per_step(fn, steps)
    return out


def run_count(configs: List[str], precisions: List[str], quick: bool, record: Dict[str, Any]) -> None:
    rows = []
    for cname in configs:
        spec = CONFIGS[cname]
        for prec in precisions:
            cfg = compose(trainrun_overrides(spec, prec, spec["batch"], 10 ** 6))
            counts = count_loops(cfg, 5 if quick else min(50, spec["steps"]))
            record["results"].append({"config": cname, "precision": prec, "per_step": counts})
            rows.extend(count_rows(cname, prec, counts))
    print(bu.table(["config", "precision", "loop", "ATen ops/step", "vs hand", "Python calls/step", "vs hand"], rows))


def count_rows(cname: str, prec: str, counts: Dict[str, Dict[str, float]]) -> List[List[str]]:
    """Table rows of per-step counts, each with its difference from the hand loop's."""
    hand = counts["hand"]
    return [[cname, prec, name, f"{c['aten_ops']:.1f}", f"{c['aten_ops'] - hand['aten_ops']:+.1f}",
             f"{c['python_calls']:.0f}", f"{c['python_calls'] - hand['python_calls']:+.0f}"]
            for name, c in counts.items()]


def run_variant(name: str, base_overrides: List[str], split, warmup: int, steps: int, cfgs: Dict) -> Dict[str, Any]:
    kind, extra, environ = VARIANTS[name]
    with env(environ):
        if kind == "trainrun":
            return run_trainrun(cfgs[name], split, warmup, steps)
        if kind == "hand":
            return run_hand(cfgs["_base"], split, warmup, steps)
        return run_lightning(cfgs["_base"], split, warmup, steps, **extra)


# ---------------------------------------------------------------------------------------------------- --paired

PAIRED = {"mlp_digits": (200, 30, 1), "resnet18_32px": (10, 4, 1)}  # chunk steps, repetitions, (quick: reps)
PAIRED_VARIANTS = ("hand", "hand_check", "floor", "trainrun", "trainrun_noguard")


def paired_loops(cfg, run_dir: Path) -> Tuple[Dict[str, Any], List]:
    """In one process, on one built model and optimizer: name -> fn(n) that trains n more steps and stamps each.
    hand: the hand loop; hand_check: the hand loop plus the exact per-step gradient check at its cheapest (one
    fused inf/NaN test of all gradients and the loss read to the host: the floor of any per-step guard); floor:
    the least work trainrun's default features need, inline (see `floor`); trainrun / trainrun_noguard:
    `loop.fit` with the run's real logger (metrics.jsonl, console lines every 10)."""
    from trainrun import loop
    from trainrun.build import build
    from trainrun.logging import RunLogger
    from trainrun.precision import total_norm

    with silenced():
        run = build(cfg, run_dir)
        logger = RunLogger(cfg.logger, run_dir, run.total, 0, {}, None)
    t, doctor, marks = run.trainer, run.trainer.doctor, []
    x_all, y_all, batch = t.train.ds.x, t.train.ds.y, cfg.data.batch_size
    orders = [epoch_batches(len(y_all), batch, cfg.seed, e) for e in range(2)]
    autocast, found, one = t.precision.autocast, torch.zeros(()), torch.ones(())

    def hand(n, check=False):
        for i in range(n):
            idx = orders[(i // len(orders[0])) % 2][i % len(orders[0])]
            x, y = x_all[idx], y_all[idx]
            t.optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = t.model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            if check:
                torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in t.params], found, one)
                if found.item() or not math.isfinite(loss.item()):
                    raise RuntimeError("non-finite step in the benchmark")
            t.optimizer.step()
            marks.append(time.perf_counter())

    def fit(n, guard=True):
        t.doctor = doctor if guard else None
        with silenced():
            loop.fit(t, log_every=cfg.logger.log_every, eval_every=10 ** 9, ckpt_every=10 ** 9,
                     stop_at=t.state.step + n, log=lambda s, m: (logger.log(s, m), marks.append(time.perf_counter())),
                     on_eval=lambda m: None, save=lambda: None, should_stop=lambda: False,
                     advance=lambda s: (logger.advance(s), marks.append(time.perf_counter())))
        t.doctor = doctor

    def floor(n):
        """What trainrun's defaults must do at the least, written inline: its batch stream (exact epoch position),
        the per-step check and host loss, the per-step LR schedule, and every 10th step the global gradient norm,
        the train accuracy and a metrics dict (to no logger)."""
        batches, host, logged = loop.micro_batches(t), 0.0, []
        for _ in range(n):
            x, y, _ = next(batches)
            t.optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = t.model(x)
            loss = t.task.loss(logits, y)
            loss.backward()
            grads, log_step = [p.grad for p in t.params], (t.state.step + 1) % 10 == 0
            if log_step:
                norm = total_norm(grads).item()
            else:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
                found.item()
            host += loss.item()
            t.optimizer.step()
            t.state.step += 1
            t.schedule.apply(t.optimizer, t.state.step)
            if log_step:
                logged.append({"train/loss": host / 10, "train/acc": float((logits.argmax(1) == y).sum()) / len(y),
                               "grad_norm": norm, "lr": t.optimizer.param_groups[0]["lr"]})
                logged.clear()
                host = 0.0
            marks.append(time.perf_counter())

    fns = {"hand": hand, "hand_check": lambda n: hand(n, True), "floor": floor, "trainrun": fit,
           "trainrun_noguard": lambda n: fit(n, False)}
    return fns, marks


def run_paired(cname: str, prec: str, quick: bool, record: Dict[str, Any]) -> List[List[str]]:
    """Chunks of `chunk` steps of each variant in turn (hand, hand_check, trainrun, ... hand, ...), on one model:
    adjacent chunks share the machine's state, so the per-chunk ratios to the hand chunk just before are much
    steadier than whole-run repetitions minutes apart. Also the 25th percentile and median of 10-step block
    times (each block holds one of trainrun's log steps)."""
    spec = CONFIGS[cname]
    chunk, reps, quick_reps = PAIRED[cname]
    reps = quick_reps if quick else reps
    cfg = compose(trainrun_overrides(spec, prec, spec["quick"][0] if quick else spec["batch"], 10 ** 8))
    with tempfile.TemporaryDirectory(prefix="bench-paired-") as d:
        fns, marks = paired_loops(cfg, Path(d))
        for fn in fns.values():  # warm-up: optimizer state, lazily built lists, allocator
            fn(10)
        blocks: Dict[str, List[float]] = {k: [] for k in fns}
        chunks: Dict[str, List[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                marks.clear()
                fn(chunk)
                blocks[name] += [(marks[i + 10] - marks[i]) / 10 for i in range(0, chunk - 10, 10)] or \
                    [(marks[-1] - marks[0]) / max(1, chunk - 1)]
                chunks[name].append((marks[-1] - marks[0]) / max(1, chunk - 1))
    q = {k: (bu.quantile(v, 0.25), statistics.median(v)) for k, v in blocks.items()}
    res = {"config": cname, "precision": prec, "chunk_steps": chunk, "reps": reps,
           "block_s_per_step": {k: bu.summary(v) for k, v in blocks.items()},
           "chunk_s_per_step": {k: bu.summary(v) for k, v in chunks.items()}}
    rows = []
    for name in fns:
        paired = [h / c for h, c in zip(chunks["hand"], chunks[name])]
        res[f"paired_ratio_{name}_over_hand"] = bu.summary(paired)
        rows.append([cname, prec, name, f"{1000 * q[name][0]:.3f}", f"{q['hand'][0] / q[name][0]:.3f}",
                     f"{1000 * q[name][1]:.3f}", f"{q['hand'][1] / q[name][1]:.3f}",
                     f"{statistics.median(paired):.3f} ({bu.quantile(paired, 0.25):.3f}-"
                     f"{bu.quantile(paired, 0.75):.3f})"])
    record["results"].append(res)
    return rows


# ---------------------------------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, few steps, small batches")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; --quick 1)")
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                    help="default: all (with --ablate or --count: mlp_digits)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                    help="default: fp32 bf16 (with --ablate: fp32)")
    ap.add_argument("--runners", nargs="+", default=None, choices=list(VARIANTS),
                    help=f"default: {' '.join(RUNNERS)} (with --ablate: {' '.join(ABLATE)})")
    ap.add_argument("--ablate", action="store_true",
                    help="attribute trainrun's overhead: add trainrun variants with the NaN guard, the console and "
                         "logging switched off one after another, trainrun with the progress bar, Lightning "
                         "without its bar; JSON to docs/bench/bench_overhead.ablate.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every runner (default 1: on a shared 2-core machine two OpenMP "
                         "threads stall whenever another process holds a core)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every config's measured steps")
    ap.add_argument("--count", action="store_true",
                    help="count ATen ops and Python calls per step (hand loop vs trainrun) instead of timing")
    ap.add_argument("--paired", action="store_true",
                    help="in one process: trainrun's loop and the hand loop in alternating chunks on one model "
                         "(steadier on a shared machine than whole runs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    configs = args.configs or (["mlp_digits"] if args.ablate or args.count else list(CONFIGS))
    precisions = args.precisions or (["fp32"] if args.ablate else list(PRECISIONS))
    runners = list(args.runners or (ABLATE if args.ablate else RUNNERS))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    versions = {"torch": torch.__version__}
    if any(VARIANTS[r][0] == "lightning" for r in runners):
        try:
            import lightning

            versions["lightning"] = lightning.__version__
            for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
                logging.getLogger(name).setLevel(logging.ERROR)  # after the import, which sets them to INFO
        except ImportError:
            print("lightning is not installed (pip install -e '.[bench]'); skipping it", file=sys.stderr)
            runners = [r for r in runners if VARIANTS[r][0] != "lightning"]
    import trainrun
    from trainrun.data import build_split

    versions["trainrun"] = getattr(trainrun, "__version__", "?")
    name = "bench_overhead" + (".ablate" if args.ablate else "")
    record = bu.header("bench_overhead", argv, args.quick)
    record.update({"versions": versions, "reps": reps, "torch_threads": torch.get_num_threads(), "runners": runners,
                   "variants": {r: {"runner": VARIANTS[r][0], "extra": VARIANTS[r][1], "env": VARIANTS[r][2]}
                                for r in runners}, "results": []})
    t_start = time.perf_counter()
    if args.paired:
        rows = [row for c in configs for prec in precisions for row in run_paired(c, prec, args.quick, record)]
        record["load_after"], record["wall_s"] = bu.load(), round(time.perf_counter() - t_start, 1)
        print(bu.table(["config", "precision", "loop", "ms/step (q25 of 10-step blocks)", "x hand",
                        "ms/step (median block)", "x hand", "x hand, paired chunks: median (IQR)"], rows))
        out = bu.write_json(args.out or bu.default_out(name + ".paired", args.quick), record)
        print(f"raw numbers: {out}")
        return record
    if args.count:
        run_count(configs, precisions, args.quick, record)
        out = bu.write_json(args.out or bu.default_out(name + ".count", args.quick), record)
        print(f"raw numbers: {out}")
        return record
    rows = []
    for cname in configs:
        spec = CONFIGS[cname]
        batch, warmup, steps = (spec["quick"] if args.quick else (spec["batch"], spec["warmup"], spec["steps"]))
        steps = max(1, int(round(steps * args.steps_scale)))
        for prec in precisions:
            overrides = trainrun_overrides(spec, prec, batch, warmup + steps)
            cfgs = {"_base": compose(overrides)}
            for r in runners:
                if VARIANTS[r][0] == "trainrun":
                    cfgs[r] = compose(overrides + VARIANTS[r][1])
            split = build_split(cfgs["_base"].data)
            per: Dict[str, List[float]] = {r: [] for r in runners}
            per_cpu: Dict[str, List[float]] = {r: [] for r in runners}
            per_block: Dict[str, List[float]] = {r: [] for r in runners}
            vl: Dict[str, List[Optional[float]]] = {r: [] for r in runners}
            for rep in range(reps):
                for r in runners:  # interleaved: A B C A B C ...
                    gc.collect()
                    out = run_variant(r, overrides, split, warmup, steps, cfgs)
                    per[r].append(steps / out["seconds"])
                    per_cpu[r].append(steps / out["cpu_seconds"])
                    per_block[r].append(1 / out["block_s_per_step"])
                    vl[r].append(out["val_loss"])
                    print(f"  {cname} {prec} rep {rep + 1}/{reps} {r}: {steps / out['seconds']:.2f} steps/s",
                          file=sys.stderr, flush=True)
            res: Dict[str, Any] = {"config": cname, "precision": prec, "batch_size": batch, "warmup_steps": warmup,
                                   "measured_steps": steps, "trainrun_overrides": overrides,
                                   "steps_per_s": {r: bu.summary(v) for r, v in per.items()},
                                   "ms_per_step": {r: bu.summary([1000 / x for x in v]) for r, v in per.items()},
                                   "steps_per_cpu_s": {r: bu.summary(v) for r, v in per_cpu.items()},
                                   "steps_per_s_block_median": {r: bu.summary(v) for r, v in per_block.items()},
                                   "cpu_ms_per_step": {r: bu.summary([1000 / x for x in v]) for r, v in per_cpu.items()},
                                   "final_val_loss": vl}
            for r in runners:
                if r != "hand" and "hand" in per:
                    res[f"ratio_{r}_over_hand"] = bu.summary([a / b for a, b in zip(per[r], per["hand"])])
                    res[f"extra_ms_{r}_vs_hand"] = bu.summary([1000 / a - 1000 / b for a, b in zip(per[r], per["hand"])])
                    res[f"block_ratio_{r}_over_hand"] = bu.summary([a / b for a, b in zip(per_block[r],
                                                                                          per_block["hand"])])
                    res[f"cpu_ratio_{r}_over_hand"] = bu.summary([a / b for a, b in zip(per_cpu[r], per_cpu["hand"])])
                    res[f"extra_cpu_ms_{r}_vs_hand"] = bu.summary([1000 / a - 1000 / b for a, b in
                                                                    zip(per_cpu[r], per_cpu["hand"])])
            record["results"].append(res)
            rows.append(res)
    record["load_after"] = bu.load()
    record["wall_s"] = round(time.perf_counter() - t_start, 1)

    ratio_runners = [r for r in runners if r != "hand" and "hand" in runners]
    print(f"\nRunner overhead: steps/s, median (min-max) of {reps} interleaved repetitions; ratios per repetition; "
          f"torch {versions['torch']}" + (f", lightning {versions['lightning']}" if "lightning" in versions else "")
          + f", {torch.get_num_threads()} thread(s); load before: {record['load_before']['uptime']}\n")
    if args.ablate:  # one row per variant: easier to read as a ladder
        trows = []
        for res in rows:
            for r in runners:
                trows.append([res["config"], res["precision"], r, bu.med_range(res["steps_per_s"][r]),
                              bu.med_range(res["ratio_" + r + "_over_hand"]) if r in ratio_runners else "1",
                              bu.med_range(res["cpu_ms_per_step"][r]),
                              bu.med_range(res["cpu_ratio_" + r + "_over_hand"]) if r in ratio_runners else "1",
                              bu.med_range(res["extra_cpu_ms_" + r + "_vs_hand"]) if r in ratio_runners else "0"])
        print(bu.table(["config", "precision", "variant", "steps/s (wall)", "x hand (wall)", "CPU ms/step",
                        "x hand (CPU)", "extra CPU ms/step vs hand"], trows))
    else:
        headers = ["config", "precision", "batch", "steps"] + [f"{r} steps/s" for r in runners] + \
            [f"{r}/hand" for r in ratio_runners] + [f"{r}/hand (10-step block median)" for r in ratio_runners] + \
            [f"{r}/hand (CPU time)" for r in ratio_runners]
        trows = []
        for res in rows:
            sp = res["steps_per_s"]
            trows.append([res["config"], res["precision"], str(res["batch_size"]),
                          f"{res['warmup_steps']}+{res['measured_steps']}"]
                         + [bu.med_range(sp[r]) for r in runners]
                         + [bu.med_range(res[f"ratio_{r}_over_hand"]) for r in ratio_runners]
                         + [bu.med_range(res[f"block_ratio_{r}_over_hand"]) for r in ratio_runners]
                         + [bu.med_range(res[f"cpu_ratio_{r}_over_hand"]) for r in ratio_runners])
        print(bu.table(headers, trows))
    same = []
    for res in rows:
        vals = [v for r in runners for v in res["final_val_loss"][r] if v is not None]
        same.append(f"{res['config']}/{res['precision']} {min(vals):.6g}..{max(vals):.6g}")
    print("\nsame-trajectory check, final val loss over all runners and repetitions: " + "; ".join(same))
    out = bu.write_json(args.out or bu.default_out(name, args.quick), record)
    print(f"raw numbers: {out}")
    return record


if __name__ == "__main__":
    main()
