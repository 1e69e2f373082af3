"""Activation checkpointing (trainrun.models.checkpointing): peak memory and step time with and without, per model.

Peak memory: a fresh worker process per variant builds the model, takes one AdamW step at batch 1 (weights,
gradients and optimizer state now allocated: the baseline RSS), then 2 steps at the full batch:
  peak RSS delta   the process's peak RSS (VmHWM) minus the baseline: activations and temporaries of the steps
                   (glibc is told to mmap allocations >= 64 KiB, MALLOC_MMAP_THRESHOLD_, so freed activations leave
                   the RSS instead of staying cached in the heap)
  estimate         activation_bytes_estimate(...): the saved-tensor measurement the memory plan uses
Step time: one worker per repetition checkpoints the model and alternates steps with the checkpointing paused and
active (checkpointing_paused), so a load spike on the shared machine hits both variants alike; the ratio of the
fastest steps (in brackets) is the steadier figure of the recomputation's cost.

    python scripts/bench_activation_checkpointing.py           # 3 repetitions
    python scripts/bench_activation_checkpointing.py --quick   # 1 repetition, 2 timed steps, JSON to the temp dir
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

# name -> (model.* keys, input shape, classes / vocabulary, batch size)
MODELS = {
    "gpt_w256_l6_block256": ({"name": "gpt", "width": 256, "layers": 6, "heads": 8, "mlp_ratio": 4.0}, (256,), 256, 8),
    "vit_tiny_32px": ({"name": "vit", "patch_size": 4, "width": 192, "layers": 12, "heads": 3, "mlp_ratio": 4.0},
                      (3, 32, 32), 10, 32),
    "resnet18_32px": ({"name": "resnet18", "small_input": True}, (3, 32, 32), 10, 32),
}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(name: str):
    import torch
    from omegaconf import OmegaConf

    from trainrun.config import ModelConfig
    from trainrun.models import build_model

    keys, shape, classes, batch = MODELS[name]
    torch.manual_seed(0)
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), keys), shape, classes, 0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def train_step(name: str, model, optimizer, n: int) -> float:
    """One AdamW step on random data at batch n; returns its wall time."""
    import torch
    import torch.nn.functional as F

    _, shape, classes, _ = MODELS[name]
    tokens = len(shape) == 1
    x = torch.randint(0, classes, (n, *shape)) if tokens else torch.randn(n, *shape)
    y = torch.randint(0, classes, (n, *shape) if tokens else (n,))
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def memory_worker(name: str, checkpointed: bool, steps: int) -> dict:
    """Peak RSS over `steps` steps above the baseline of a batch-1 step (weights, gradients, AdamW state)."""
    from trainrun.models.checkpointing import activation_bytes_estimate, apply_activation_checkpointing

    _, shape, _, batch = MODELS[name]
    model, optimizer = build(name)
    estimate = activation_bytes_estimate(model, shape, batch, checkpointed)
    if checkpointed:
        apply_activation_checkpointing(model)
    train_step(name, model, optimizer, 1)
    baseline = rss_bytes("VmRSS")
    for _ in range(steps):
        train_step(name, model, optimizer, batch)
    return {"peak_rss_delta": rss_bytes("VmHWM") - baseline, "estimate": estimate, "batch": batch}


def timing_worker(name: str, steps: int) -> dict:
    """Step times of one checkpointed model with its checkpointing paused and active, alternating step by step (a
    load spike on the shared machine hits both); the first pair is warm-up."""
    import torch

    from trainrun.models.checkpointing import apply_activation_checkpointing, checkpointing_paused

    _, _, _, batch = MODELS[name]
    model, optimizer = build(name)
    apply_activation_checkpointing(model)
    times = {"off": [], "on": []}
    for _ in range(steps + 1):
        with checkpointing_paused(model):
            times["off"].append(train_step(name, model, optimizer, batch))
        times["on"].append(train_step(name, model, optimizer, batch))
    return {"off": times["off"][1:], "on": times["on"][1:], "threads": torch.get_num_threads()}


def measure(*args: str) -> dict:
    # the mmap threshold only for the memory workers: fresh pages on every allocation would slow the timed steps
    env = {**bu.quiet_env(), **({"MALLOC_MMAP_THRESHOLD_": "65536"} if "--memory-worker" in args else {})}
    p = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True,
                       cwd=bu.REPO)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and repetition")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--memory-worker")
    ap.add_argument("--timing-worker")
    ap.add_argument("--checkpointed", type=int, default=0)
    args = ap.parse_args()
    if args.memory_worker or args.timing_worker:
        print(json.dumps(memory_worker(args.memory_worker, bool(args.checkpointed), 2) if args.memory_worker
                         else timing_worker(args.timing_worker, args.steps)))
        return
    reps, steps = (1, 2) if args.quick else (args.reps, args.steps)
    record = bu.header("bench_activation_checkpointing", sys.argv[1:], args.quick)
    runs = {name: {"memory_off": [], "memory_on": [], "timing": []} for name in args.models}
    for _ in range(reps):
        for name in args.models:
            for on in (0, 1):
                runs[name][f"memory_{'on' if on else 'off'}"].append(
                    measure("--memory-worker", name, "--checkpointed", str(on)))
            runs[name]["timing"].append(measure("--timing-worker", name, "--steps", str(steps)))
    record["results"] = runs
    record["load_after"] = bu.load()
    print(bu.table(["model", "batch", "peak RSS delta off", "on", "on/off", "estimate off", "estimate on",
                    "step s off", "step s on", "time on/off (of the minima)"],
                   [row(name, result) for name, result in runs.items()]))
    out = bu.write_json(args.out or bu.default_out("bench_activation_checkpointing", args.quick), record)
    print(f"\n{reps} repetitions of each model (peak RSS: 2 steps in a fresh process per variant; step time: "
          f"{steps} steps per variant, alternating in one process), median (min-max); JSON: {out}")


def row(name: str, result: dict) -> list:
    off, on = (bu.summary([r["peak_rss_delta"] for r in result[k]]) for k in ("memory_off", "memory_on"))
    t_off, t_on = (bu.summary([t for r in result["timing"] for t in r[k]]) for k in ("off", "on"))
    return [name, str(result["memory_off"][0]["batch"]), bu.human_bytes(off["median"]), bu.human_bytes(on["median"]),
            f"{on['median'] / off['median']:.2f}x", bu.human_bytes(result["memory_off"][0]["estimate"]),
            bu.human_bytes(result["memory_on"][0]["estimate"]), bu.med_range(t_off), bu.med_range(t_on),
            f"{t_on['median'] / t_off['median']:.2f}x ({t_on['min'] / t_off['min']:.2f}x)"]


if __name__ == "__main__":
    main()
