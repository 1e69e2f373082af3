"""Language-model throughput: trainrun's training loop vs a nanoGPT-style hand loop, in tokens/s.

The same GPT (`trainrun.models.build_model` + `trainrun.init.apply_init`, seeded like trainrun seeds it), the
same optimizer (`trainrun.optim.build_optimizer`: AdamW, trainrun's parameter groups), the same token blocks of the
Python stdlib (data=text, byte tokenizer) visited in the same order (trainrun's `randperm(seed, epoch)`), the same
number of steps, run two ways:

  trainrun   `trainrun.runner.run(cfg, run_dir)` in-process, `task=causal_lm data=text model=gpt optimizer=adamw
             schedule=constant`, logging every 10 steps, plots off, the doctor's NaN guard on (the default); eval and
             checkpoint only after the last step. The loss is the cross-entropy summed over the step's counted
             tokens times 1 / (their number).
  hand       nanoGPT's train.py loop reduced to its core: forward under autocast (bf16) -> loss =
             F.cross_entropy(logits.view(-1, V), y.view(-1)) -> backward -> optimizer.step ->
             zero_grad(set_to_none=True); no per-step .item().

The measured window is `steps` optimizer steps after `warmup` steps (trainrun: the logger's per-step
`advance`/`log` timestamps, as in bench_overhead), so building, Hydra, the final eval and the checkpoint are outside
it. tokens/s = steps/s x batch x block. Repetitions are interleaved (trainrun hand trainrun hand ...); ratios are
taken within a repetition, then the median and min-max over repetitions. After each run the final validation loss
is recorded: both runners train the same trajectory, so it agrees to float rounding (a sum x 1/n vs a mean).

    python scripts/bench_lm.py                 # full run (~10 min on a 2-core CPU)
    python scripts/bench_lm.py --quick         # smoke run (<20 s), JSON to the temp dir
    python scripts/bench_lm.py --ablate        # + trainrun without the NaN guard, and without logging either
    python scripts/bench_lm.py --count         # per-step ATen ops and Python calls: load-independent
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import bench_overhead as bo  # noqa: E402  (compose, silenced, stamp, window, epoch_batches, run_trainrun)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name -> GPT shape, batch, block, (warmup, measured steps); quick: (batch, block, warmup, steps)
CONFIGS: Dict[str, Dict[str, Any]] = {
    "gpt_tiny": {"model": {"width": 128, "layers": 4, "heads": 4}, "batch": 16, "block": 128,
                 "warmup": 5, "steps": 40, "quick": (4, 32, 2, 8)},
    "gpt_small": {"model": {"width": 256, "layers": 6, "heads": 8}, "batch": 8, "block": 256,
                  "warmup": 3, "steps": 12, "quick": (2, 32, 1, 2)},
}
PRECISIONS = ("fp32", "bf16")
# runner name -> (kind, extra trainrun overrides)
VARIANTS: Dict[str, Any] = {
    "trainrun": ("trainrun", []),
    "hand": ("hand", []),
    "trainrun_noguard": ("trainrun", ["doctor.nan_guard=off"]),
    # and no log step inside the window (the one at the last step is the window's end)
    "trainrun_noguard_nolog": ("trainrun", ["doctor.nan_guard=off", "logger.progress=off",
                                            "logger.log_every=100000000"]),
}
RUNNERS = ("trainrun", "hand")
ABLATE = ("trainrun", "trainrun_noguard", "trainrun_noguard_nolog", "hand")
COUNT_STEPS = 10  # --count: steps counted = logger.log_every (one log step among them, as in a run)
MAX_BYTES = 300_000  # ~2,300 blocks of 129 bytes: the corpus loads in well under a second


def overrides_for(spec: Dict[str, Any], precision: str, batch: int, block: int, total: int,
                  max_bytes: int) -> List[str]:
    return ["task=causal_lm", "data=text", "model=gpt", "init=gpt2", "optimizer=adamw", "schedule=constant",
            *[f"model.{k}={v}" for k, v in spec["model"].items()], f"data.block_size={block}",
            f"data.max_bytes={max_bytes}", f"precision={precision}", f"data.batch_size={batch}",
            f"trainer.max_steps={total}", f"trainer.eval_every={total}", f"trainer.ckpt_every={total}",
            "trainer.device=cpu", "data.limit_val=32", "logger.log_every=10", "logger.plots=false", "seed=0"]


def build_lm(cfg, split):
    """The GPT and its optimizer as trainrun.build makes them: seed_everything, build_model, apply_init."""
    from trainrun.data import sample_inputs
    from trainrun.init import apply_init
    from trainrun.models import build_model
    from trainrun.optim import build_optimizer
    from trainrun.regularization import effective_dropout
    from trainrun.seed import seed_everything

    seed_everything(cfg.seed)
    dropout = effective_dropout(cfg.regularization, cfg.model)
    model = build_model(cfg.model, split.input_shape, split.vocab_size, dropout)
    apply_init(model, cfg.init, cfg.model.activation, batch=sample_inputs(split.train, cfg.data.batch_size))
    return model, build_optimizer(model, cfg.optimizer, cfg.data.batch_size)


def lm_val_loss(model, cfg, split) -> float:
    """val/loss (nats per token) by trainrun's own evaluation with the causal_lm task."""
    from trainrun.data import BatchStream
    from trainrun.loop import evaluate
    from trainrun.precision import PrecisionPolicy
    from trainrun.tasks.build import build_task

    cpu = torch.device("cpu")
    val = BatchStream(split.val, cfg.data.eval_batch_size, cfg.seed, shuffle=False, drop_last=False)
    return evaluate(model, val, PrecisionPolicy(cfg.precision, cpu), cpu, task=build_task(cfg, split, cpu))["val/loss"]


def run_hand(cfg, split, warmup: int, steps: int) -> Dict[str, Any]:
    """nanoGPT's loop (bench_overhead.hand_loop): autocast(bf16) or nullcontext, the cross-entropy over every
    position in fp32, backward, step, zero_grad(set_to_none=True)."""
    model, opt = build_lm(cfg, split)

    def loss_of(logits, y):
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))

    timing = bo.hand_loop(model, opt, cfg, split, warmup, steps, loss_of)
    return {**timing, "val_loss": lm_val_loss(model, cfg, split)}


def count_lm(cfg, steps: int) -> Dict[str, Dict[str, float]]:
    """Per-step ATen ops and Python calls of the hand loop and of trainrun's fit (guard on / off) on the model,
    optimizer and blocks trainrun.build makes (no logger, eval or checkpoint inside): load-independent."""
    from trainrun import loop
    from trainrun.build import build

    with tempfile.TemporaryDirectory(prefix="bench-lm-count-") as d, bo.silenced():
        run = build(cfg, Path(d))
    t, doctor = run.trainer, run.trainer.doctor
    x_all, y_all, batch = t.train.ds.x, t.train.ds.y, cfg.data.batch_size
    order = bo.epoch_batches(len(y_all), batch, cfg.seed, 0)

    def hand(n):
        for i in range(n):
            idx = order[i % len(order)]
            x, y = x_all[idx], y_all[idx]
            with t.precision.autocast():
                logits = t.model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)

    def trainrun_fit(guard: bool):
        def fn(n):
            t.doctor, t.state.step = (doctor if guard else None), 0
            loop.fit(t, log_every=cfg.logger.log_every, eval_every=10 ** 9, ckpt_every=10 ** 9, stop_at=n,
                     log=lambda s, m: None, on_eval=lambda m: None, save=lambda: None, advance=lambda s: None,
                     should_stop=lambda: False)
        return fn

    out = {}
    for name, fn in {"hand": hand, "trainrun (guard)": trainrun_fit(True),
                     "trainrun (no guard)": trainrun_fit(False)}.items():
        fn(3)  # optimizer state, lazily built lists
        out[name] = bo.count_per_step(fn, steps)
    return out


def run_count(configs: List[str], precisions: List[str], quick: bool, max_bytes: int, record: Dict[str, Any]) -> None:
    rows = []
    for cname in configs:
        spec = CONFIGS[cname]
        batch, block = spec["quick"][:2] if quick else (spec["batch"], spec["block"])
        for prec in precisions:
            # one epoch of COUNT_STEPS batches: a fresh fit() call slices its whole epoch's order once (about one
            # slice per step over a long run; thousands per call on the full set), and one log step in the window
            overrides = overrides_for(spec, prec, batch, block, 10 ** 6, max_bytes)
            counts = count_lm(bo.compose(overrides + [f"data.limit_train={batch * COUNT_STEPS}"]), COUNT_STEPS)
            record["results"].append({"config": cname, "precision": prec, "per_step": counts})
            rows.extend(bo.count_rows(cname, prec, counts))
    print(bu.table(["config", "precision", "loop", "ATen ops/step", "vs hand", "Python calls/step", "vs hand"], rows))


def run_variant(name: str, cfgs: Dict[str, Any], split, warmup: int, steps: int) -> Dict[str, Any]:
    if VARIANTS[name][0] == "hand":
        return run_hand(cfgs["_base"], split, warmup, steps)
    return bo.run_trainrun(cfgs[name], split, warmup, steps)


def measure(cname: str, prec: str, runners: List[str], reps: int, quick: bool, max_bytes: int) -> Dict[str, Any]:
    """Interleaved repetitions of every runner on one config and precision; tokens/s and ratios to hand."""
    from trainrun.data import build_split

    spec = CONFIGS[cname]
    batch, block, warmup, steps = spec["quick"] if quick else (spec["batch"], spec["block"], spec["warmup"],
                                                               spec["steps"])
    overrides = overrides_for(spec, prec, batch, block, warmup + steps, max_bytes)
    cfgs = {"_base": bo.compose(overrides)}
    cfgs.update({r: bo.compose(overrides + VARIANTS[r][1]) for r in runners if VARIANTS[r][0] == "trainrun"})
    with bo.silenced():
        split = build_split(cfgs["_base"].data, classifies=False)
    tokens = batch * block
    tps: Dict[str, List[float]] = {r: [] for r in runners}
    tps_cpu: Dict[str, List[float]] = {r: [] for r in runners}
    vl: Dict[str, List[Optional[float]]] = {r: [] for r in runners}
    for rep in range(reps):
        for r in runners:  # interleaved: A B A B ...
            gc.collect()
            out = run_variant(r, cfgs, split, warmup, steps)
            tps[r].append(steps * tokens / out["seconds"])
            tps_cpu[r].append(steps * tokens / out["cpu_seconds"])
            vl[r].append(out["val_loss"])
            print(f"  {cname} {prec} rep {rep + 1}/{reps} {r}: {tps[r][-1]:,.0f} tokens/s "
                  f"(val loss {out['val_loss']:.6f})", file=sys.stderr, flush=True)
    res: Dict[str, Any] = {"config": cname, "precision": prec, "batch_size": batch, "block_size": block,
                           "tokens_per_step": tokens, "warmup_steps": warmup, "measured_steps": steps,
                           "trainrun_overrides": overrides, "tokens_per_s": {r: bu.summary(v) for r, v in tps.items()},
                           "tokens_per_cpu_s": {r: bu.summary(v) for r, v in tps_cpu.items()},
                           "ms_per_step": {r: bu.summary([1000 * tokens / x for x in v]) for r, v in tps.items()},
                           "cpu_ms_per_step": {r: bu.summary([1000 * tokens / x for x in v])
                                               for r, v in tps_cpu.items()},
                           "final_val_loss": vl}
    for r in runners:
        if r != "hand" and "hand" in runners:
            res[f"ratio_{r}_over_hand"] = bu.summary([a / b for a, b in zip(tps[r], tps["hand"])])
            res[f"cpu_ratio_{r}_over_hand"] = bu.summary([a / b for a, b in zip(tps_cpu[r], tps_cpu["hand"])])
            res[f"extra_cpu_ms_{r}_vs_hand"] = bu.summary([1000 * tokens / a - 1000 * tokens / b
                                                            for a, b in zip(tps_cpu[r], tps_cpu["hand"])])
    return res


def print_tables(results: List[Dict[str, Any]], runners: List[str], record: Dict[str, Any]) -> None:
    ratio = [r for r in runners if r != "hand" and "hand" in runners]
    headers = ["config", "precision", "batch x block", "steps"] + [f"{r} tokens/s" for r in runners] + \
        [f"{r}/hand" for r in ratio] + [f"{r}/hand (CPU time)" for r in ratio] + \
        [f"{r} extra CPU ms/step" for r in ratio]
    rows = []
    for res in results:
        rows.append([res["config"], res["precision"], f"{res['batch_size']} x {res['block_size']}",
                     f"{res['warmup_steps']}+{res['measured_steps']}"]
                    + [bu.med_range(res["tokens_per_s"][r]) for r in runners]
                    + [bu.med_range(res[f"ratio_{r}_over_hand"]) for r in ratio]
                    + [bu.med_range(res[f"cpu_ratio_{r}_over_hand"]) for r in ratio]
                    + [bu.med_range(res[f"extra_cpu_ms_{r}_vs_hand"]) for r in ratio])
    print(f"\nLM throughput: tokens/s, median (min-max) of {record['reps']} interleaved repetitions; ratios per "
          f"repetition; torch {torch.__version__}, {record['torch_threads']} thread(s); load before: "
          f"{record['load_before']['uptime']}\n")
    print(bu.table(headers, rows))
    checks = []
    for res in results:
        vals = [v for r in runners for v in res["final_val_loss"][r] if v is not None]
        spread = (max(vals) - min(vals)) / abs(min(vals)) if vals else float("nan")
        checks.append(f"{res['config']}/{res['precision']} {min(vals):.6g}..{max(vals):.6g} (rel {spread:.1e})")
    print("\nsame-trajectory check, final val loss over all runners and repetitions: " + "; ".join(checks))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, tiny batches and blocks")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; --quick 1)")
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS), help="default: all")
    ap.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS), help="default: fp32 bf16")
    ap.add_argument("--runners", nargs="+", default=None, choices=list(VARIANTS),
                    help=f"default: {' '.join(RUNNERS)} (with --ablate: {' '.join(ABLATE)})")
    ap.add_argument("--ablate", action="store_true", help="add trainrun without the NaN guard, then without logging")
    ap.add_argument("--count", action="store_true",
                    help="count ATen ops and Python calls per step (hand loop vs trainrun) instead of timing")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared cores)")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="data.max_bytes of the stdlib corpus")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    configs = args.configs or list(CONFIGS)
    precisions = args.precisions or list(PRECISIONS)
    runners = list(args.runners or (ABLATE if args.ablate else RUNNERS))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    name = "bench_lm" + (".ablate" if args.ablate else "")
    record = bu.header("bench_lm", argv, args.quick)
    record.update({"reps": reps, "torch_threads": torch.get_num_threads(), "runners": runners,
                   "variants": {r: VARIANTS[r][1] for r in runners}, "results": []})
    t_start = time.perf_counter()
    if args.count:
        run_count(configs, precisions, args.quick, args.max_bytes, record)
        out = bu.write_json(args.out or bu.default_out(name + ".count", args.quick), record)
        print(f"raw numbers: {out}")
        return record
    for cname in configs:
        for prec in precisions:
            record["results"].append(measure(cname, prec, runners, reps, args.quick, args.max_bytes))
    record["load_after"] = bu.load()
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_tables(record["results"], runners, record)
    print(f"load after: {record['load_after']['uptime']}")
    out = bu.write_json(args.out or bu.default_out(name, args.quick), record)
    print(f"raw numbers: {out}")
    return record


if __name__ == "__main__":
    main()
