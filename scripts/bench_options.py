"""trainer.channels_last and trainer.compile: their measured effect on trainrun's training throughput.

Each variant is a real `trainrun` run (subprocess) of the same model, data, batch and steps; throughput is the
median `samples_per_s` over the log windows after the first `--skip` windows (torch.compile compiles during the
first steps; the warm-up cost is reported separately as the run's extra wall time). Variants are interleaved.

    python scripts/bench_options.py            # resnet18 on 3x32x32 and the digits CNN, 2 repetitions
    python scripts/bench_options.py --quick    # one repetition, fewer steps
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

CONFIGS = {
    "resnet18_32px": ["data=synthetic", "data.input_shape=[3,32,32]", "data.num_samples=2048", "model=resnet18",
                      "data.batch_size=32"],
    "cnn_digits": ["data=digits", "model=cnn", "data.batch_size=64"],
}
VARIANTS = {
    "eager": [],
    "channels_last": ["trainer.channels_last=true"],
    "compile": ["trainer.compile=true"],
    "compile+channels_last": ["trainer.compile=true", "trainer.channels_last=true"],
}


def one_run(cfg: list, extra: list, steps: int, log_every: int, skip: int):
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "trainrun", *cfg, *extra, f"trainer.max_steps={steps}",
               f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}", "data.limit_val=64",
               f"logger.log_every={log_every}", "logger.progress=lines", "logger.plots=false", "run_name=b"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=d, env=bu.quiet_env(), check=True, capture_output=True)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(d) / "runs/b/metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][skip:]
    return bu.median(rates), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    steps, log_every, skip = (15, 5, 1) if args.quick else (40, 5, 2)
    record = bu.header("bench_options", sys.argv, args.quick)
    results = []
    for name in args.configs:
        rates = {v: [] for v in VARIANTS}
        walls = {v: [] for v in VARIANTS}
        for _ in range(reps):
            for v, extra in VARIANTS.items():
                r, w = one_run(CONFIGS[name], extra, steps, log_every, skip)
                rates[v].append(r)
                walls[v].append(w)
        base = bu.median(rates["eager"])
        results.append({"config": name, "overrides": CONFIGS[name], "steps": steps,
                        "samples_per_s": {v: bu.summary(x) for v, x in rates.items()},
                        "speedup_vs_eager": {v: bu.median(x) / base for v, x in rates.items()},
                        "wall_s": {v: bu.summary(x) for v, x in walls.items()}})
    record["results"] = results
    rows = [[r["config"], v, bu.med_range(r["samples_per_s"][v], 4), f"{r['speedup_vs_eager'][v]:.2f}x",
             bu.fmt(r["wall_s"][v]["median"])] for r in results for v in VARIANTS]
    print(bu.table(["config", "variant", "samples/s median (min-max)", "vs eager", f"run wall s ({steps} steps)"], rows))
    path = bu.write_json(args.out or bu.default_out("bench_options", args.quick), record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
