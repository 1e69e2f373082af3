"""Activation checkpointing (trainrun.models.checkpointing): peak memory and step time with and without, per model.

Each measurement is a fresh worker process (this script with --worker) that builds the model, takes one AdamW step
at batch 1 (weights, gradients and optimizer state now allocated: the baseline RSS), then `--steps` training steps
at the full batch. It reports:
  peak_rss_delta   the process's peak RSS (VmHWM) minus the baseline: activations and temporaries of the steps
                   (glibc is told to mmap allocations >= 64 KiB, MALLOC_MMAP_THRESHOLD_, so freed activations leave
                   the RSS instead of staying cached in the heap)
  estimate         activation_bytes_estimate(...): the saved-tensor measurement the memory plan uses
  step_s           median wall time of the steps after the first
Variants are interleaved (off on off on ...) so load spikes hit both alike; on a shared machine the ratio of the
fastest repetitions (in brackets) is the steadier figure of the recomputation's cost.

    python scripts/bench_activation_checkpointing.py           # 3 repetitions
    python scripts/bench_activation_checkpointing.py --quick   # 1 repetition, 2 steps, JSON to the temp dir
"""
from __future__ import annotations

import argparse
import json
import os
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


def worker(name: str, checkpointed: bool, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from trainrun.config import ModelConfig
    from trainrun.models import build_model
    from trainrun.models.checkpointing import activation_bytes_estimate, apply_activation_checkpointing

    keys, shape, classes, batch = MODELS[name]
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), keys)
    model = build_model(cfg, shape, classes, 0.0)
    estimate = activation_bytes_estimate(model, shape, batch, checkpointed)
    if checkpointed:
        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = len(shape) == 1

    def step(n: int) -> None:
        x = torch.randint(0, classes, (n, *shape)) if tokens else torch.randn(n, *shape)
        y = torch.randint(0, classes, (n, *shape) if tokens else (n,))
        out = model(x)
        loss = F.cross_entropy(out.flatten(0, -2), y.flatten())
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    model.train()
    step(1)
    baseline = rss_bytes("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return {"peak_rss_delta": rss_bytes("VmHWM") - baseline, "estimate": estimate,
            "step_s": bu.median(times[1:] or times), "batch": batch, "threads": torch.get_num_threads()}


def measure(name: str, checkpointed: bool, steps: int) -> dict:
    env = {**bu.quiet_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--worker", name, "--checkpointed", str(int(checkpointed)), "--steps", str(steps)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=bu.REPO)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker")
    ap.add_argument("--checkpointed", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, bool(args.checkpointed), args.steps)))
        return
    reps, steps = (1, 2) if args.quick else (args.reps, args.steps)
    record = bu.header("bench_activation_checkpointing", sys.argv[1:], args.quick)
    runs = {name: {"off": [], "on": []} for name in args.models}
    for _ in range(reps):
        for name in args.models:
            for variant in ("off", "on"):
                runs[name][variant].append(measure(name, variant == "on", steps))
    record["results"] = runs
    record["load_after"] = bu.load()
    rows = []
    for name, variants in runs.items():
        off, on = (bu.summary([r["peak_rss_delta"] for r in variants[v]]) for v in ("off", "on"))
        t_off, t_on = (bu.summary([r["step_s"] for r in variants[v]]) for v in ("off", "on"))
        rows.append([name, str(variants["off"][0]["batch"]),
                     bu.human_bytes(off["median"]), bu.human_bytes(on["median"]),
                     f"{on['median'] / off['median']:.2f}x",
                     bu.human_bytes(variants["off"][0]["estimate"]), bu.human_bytes(variants["on"][0]["estimate"]),
                     bu.med_range(t_off), bu.med_range(t_on),
                     f"{t_on['median'] / t_off['median']:.2f}x ({t_on['min'] / t_off['min']:.2f}x)"])
    headers = ["model", "batch", "peak RSS delta off", "on", "on/off", "estimate off", "estimate on",
               "step s off", "step s on", "time on/off (of the minima)"]
    print(bu.table(headers, rows))
    out = bu.write_json(args.out or bu.default_out("bench_activation_checkpointing", args.quick), record)
    print(f"\n{reps} repetitions (interleaved), {steps} steps each, median (min-max); JSON: {out}")


if __name__ == "__main__":
    main()
