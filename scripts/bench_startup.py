"""Startup cost: from the command to the first training step, and what the start path imports.

Measured, each as a fresh process, interleaved over repetitions (median and min-max reported):

  python -c pass                       the interpreter alone
  python -c "import torch"             the floor any PyTorch runner pays
  python -c "import trainrun.cli"      trainrun's CLI module (Hydra, OmegaConf, the config schema)
  trainrun trainer.max_steps=1         the default run (digits, CNN) cut to one step, as a user types it: the whole
                                       command's wall time, and the first step's completion time read from the
                                       run's metrics.jsonl (logger.log_every=1 writes a row after step 1)
  probe                                the same run through a wrapper that timestamps the first call of
                                       `trainrun.loop.train_step` (start and end of step 1) and records which heavy
                                       modules are in sys.modules at that moment and at exit

Plus one `python -X importtime` of the probe run: the heaviest packages on the path to the first step (summed
self time of their modules), the heaviest single imports (cumulative), and which heavy optional modules
(wandb, torchvision, matplotlib, sklearn, scipy, lightning, ...) a default run never imports.

    python scripts/bench_startup.py              # full run (~1-2 min)
    python scripts/bench_startup.py --quick      # smoke run (<30 s), JSON to the temp dir
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

HEAVY = ["torch", "hydra", "omegaconf", "rich", "numpy", "torchvision", "matplotlib", "sklearn", "scipy", "wandb",
         "lightning", "pytorch_lightning", "pandas", "transformers", "optuna", "PIL", "tensorboard",
         "torch._dynamo", "torch._inductor", "torch.distributed.fsdp", "submitit", "mlxtend"]
OPTIONAL_HEAVY = ["wandb", "torchvision", "matplotlib", "sklearn", "scipy", "lightning", "pandas", "transformers",
                  "optuna", "PIL", "torch._dynamo", "torch._inductor"]

PROBE = r"""
import atexit, json, os, sys, time
T0 = float(os.environ["BENCH_T0"])
HEAVY = json.loads(os.environ["BENCH_HEAVY"])
rec = {"started_s": time.time() - T0}
def snap():
    return sorted(m for m in HEAVY if m in sys.modules)
def dump():
    rec["exit_s"] = time.time() - T0
    rec["at_exit"] = snap()
    rec["n_modules_at_exit"] = len(sys.modules)
    with open(os.environ["BENCH_PROBE_OUT"], "w") as f:
        json.dump(rec, f)
atexit.register(dump)
now = lambda: time.time() - T0
import trainrun.cli, trainrun.loop as _loop, trainrun.runner as _runner
rec["imports_done_s"] = now()
def _wrap(mod, name, key):  # timestamps of the start-path phases (skipped if the runner renamed them)
    orig = getattr(mod, name, None)
    if orig is None:
        return
    def w(*a, **k):
        rec.setdefault(key + "_start_s", now())
        try:
            return orig(*a, **k)
        finally:
            rec.setdefault(key + "_end_s", now())
    setattr(mod, name, w)
for _name, _key in (("run", "run"), ("build_split", "data"), ("build_model", "model"),
                    ("build_optimizer", "optimizer")):
    _wrap(_runner, _name, _key)
_orig = _loop.train_step
def _first(*a, **k):
    if "first_step_start_s" in rec:
        return _orig(*a, **k)
    rec["first_step_start_s"] = time.time() - T0
    rec["at_first_step"] = snap()
    rec["n_modules_at_first_step"] = len(sys.modules)
    out = _orig(*a, **k)
    rec["first_step_done_s"] = time.time() - T0
    return out
_loop.train_step = _first
from trainrun.cli import main
sys.argv = ["trainrun", *json.loads(os.environ["BENCH_ARGS"])]
sys.exit(main())
"""


def trainrun_cmd() -> List[str]:
    exe = shutil.which("trainrun")
    return [exe] if exe else [sys.executable, "-m", "trainrun"]


def timed(cmd: List[str], cwd: Path, env: Dict[str, str], timeout: int = 300) -> Dict[str, Any]:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, env={**env, "BENCH_T0": repr(t0)}, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return {"wall_s": wall, "t0": t0, "stderr": p.stderr}


def first_row_time(run_root: Path) -> Optional[float]:
    rows = sorted(run_root.glob("runs/*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not rows:
        return None
    for line in rows[-1].read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == 1 and "train/loss" in row:
            return row["time"]
    return None


def parse_importtime(stderr: str) -> List[Dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
        if m:
            out.append({"self_us": int(m.group(1)), "cum_us": int(m.group(2)), "depth": (len(m.group(3)) - 1) // 2,
                        "module": m.group(4)})
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; --quick 1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    env = bu.quiet_env()
    env["BENCH_HEAVY"] = json.dumps(HEAVY)
    run_args = ["trainer.max_steps=1", "logger.log_every=1"]
    env["BENCH_ARGS"] = json.dumps(run_args)
    record = bu.header("bench_startup", argv, args.quick)
    record.update({"reps": reps, "trainrun_command": trainrun_cmd() + run_args, "results": {}})
    py = sys.executable
    variants = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "python -c 'import trainrun.cli'": [py, "-c", "import trainrun.cli"],
        "trainrun " + " ".join(run_args): trainrun_cmd() + run_args,
        "probe (same run, timestamps the first train_step)": [py, "-c", PROBE],
        # the floor of any PyTorch training script: torch.optim's first optimizer imports torch._dynamo (~1 s)
        "python -c 'import torch; torch.optim.AdamW(...)'": [py, "-c", "import torch; torch.optim.AdamW("
                                                             "[torch.zeros(1, requires_grad=True)])"],
    }
    walls: Dict[str, List[float]] = {k: [] for k in variants}
    first_row: List[float] = []
    probes: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        cwd = Path(d)
        # one untimed run of everything first (not with --quick): the page cache then holds the files, as on a
        # machine in use
        for name, cmd in (variants.items() if not args.quick else ()):
            timed(cmd, cwd, {**env, "BENCH_PROBE_OUT": str(cwd / "probe.json")})
        for rep in range(reps):
            for name, cmd in variants.items():  # interleaved
                probe_out = cwd / f"probe-{rep}.json"
                r = timed(cmd, cwd, {**env, "BENCH_PROBE_OUT": str(probe_out)})
                walls[name].append(r["wall_s"])
                if name.startswith("trainrun"):
                    t = first_row_time(cwd)
                    if t is not None:
                        first_row.append(t - r["t0"])
                if name.startswith("probe") and probe_out.is_file():
                    probes.append(json.loads(probe_out.read_text()))
                print(f"  rep {rep + 1}/{reps} {name}: {r['wall_s']:.2f} s", file=sys.stderr, flush=True)
        # -X importtime of the probe run: the whole start path, the first step included
        r = timed([py, "-X", "importtime", "-c", PROBE], cwd, {**env, "BENCH_PROBE_OUT": str(cwd / "probe-it.json")})
        it_probe = json.loads((cwd / "probe-it.json").read_text())
        imports = parse_importtime(r["stderr"])
        r_cli = timed([py, "-X", "importtime", "-c", "import trainrun.cli"], cwd, env)
        cli_imports = parse_importtime(r_cli["stderr"])
        r_torch = timed([py, "-X", "importtime", "-c", "import torch"], cwd, env)
        torch_imports = parse_importtime(r_torch["stderr"])

    res = record["results"]
    res["wall_s"] = {k: bu.summary(v) for k, v in walls.items()}
    res["trainrun_first_step_logged_s"] = bu.summary(first_row)
    for key in ("started_s", "first_step_start_s", "first_step_done_s", "exit_s"):
        res["probe_" + key] = bu.summary([p[key] for p in probes if key in p])
    phases = [("python starts, the wrapper runs", None, "started_s"),
              ("imports: trainrun.cli, trainrun.runner, trainrun.loop (torch, hydra, omegaconf, rich)", "started_s",
               "imports_done_s"),
              ("Hydra: compose + the config node, until runner.run", "imports_done_s", "run_start_s"),
              ("runner.run until build_split (validate, seed, device)", "run_start_s", "data_start_s"),
              ("build_split (data load, checks, fingerprint)", "data_start_s", "data_end_s"),
              ("build_model", "model_start_s", "model_end_s"),
              ("build_optimizer (torch.optim's first optimizer imports torch._dynamo)", "optimizer_start_s",
               "optimizer_end_s"),
              ("rest of the set-up (schedule, precision, logger, memory plan, config tree)", "optimizer_end_s",
               "first_step_start_s"),
              ("the first training step", "first_step_start_s", "first_step_done_s"),
              ("after it: eval, checkpoint, plots, exit", "first_step_done_s", "exit_s")]
    res["probe_phases_s"] = {}
    for label, a, b in phases:
        vals = [p[b] - (p[a] if a else 0.0) for p in probes if b in p and (a is None or a in p)]
        if vals:
            res["probe_phases_s"][label] = bu.summary(vals)
    last = probes[-1] if probes else it_probe
    res["heavy_at_first_step"] = last.get("at_first_step")
    res["heavy_at_exit"] = last.get("at_exit")
    res["optional_heavy_never_imported"] = [m for m in OPTIONAL_HEAVY if m not in (last.get("at_exit") or [])]
    res["optional_heavy_imported_after_first_step"] = [m for m in OPTIONAL_HEAVY if m in (last.get("at_exit") or [])
                                                       and m not in (last.get("at_first_step") or [])]
    res["optional_heavy_imported_before_first_step"] = [m for m in OPTIONAL_HEAVY
                                                        if m in (last.get("at_first_step") or [])]
    # importtime totals: top-level imports' cumulative time, per-package sums of self time
    def by_package(imps):
        pk: Dict[str, int] = {}
        for i in imps:
            root = i["module"].split(".")[0]
            pk[root] = pk.get(root, 0) + i["self_us"]
        return dict(sorted(pk.items(), key=lambda kv: -kv[1]))
    res["importtime_cli_total_ms"] = sum(i["cum_us"] for i in cli_imports if i["depth"] == 0) / 1000
    res["importtime_torch_total_ms"] = sum(i["cum_us"] for i in torch_imports if i["depth"] == 0) / 1000
    res["importtime_run_total_ms"] = sum(i["cum_us"] for i in imports if i["depth"] == 0) / 1000
    res["importtime_run_by_package_ms"] = {k: v / 1000 for k, v in by_package(imports).items()}
    res["importtime_cli_by_package_ms"] = {k: v / 1000 for k, v in by_package(cli_imports).items()}
    top = sorted((i for i in imports if i["depth"] == 0), key=lambda i: -i["cum_us"])[:15]
    res["importtime_run_top_level_ms"] = [{"module": i["module"], "cumulative_ms": i["cum_us"] / 1000} for i in top]
    tr = sorted((i for i in imports if i["module"].startswith("trainrun")), key=lambda i: -i["cum_us"])[:12]
    res["importtime_trainrun_modules_ms"] = [{"module": i["module"], "cumulative_ms": i["cum_us"] / 1000,
                                              "self_ms": i["self_us"] / 1000} for i in tr]
    record["load_after"] = bu.load()
    record["wall_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\nStartup: wall seconds, median (min-max) of {reps} interleaved runs; load before: "
          f"{record['load_before']['uptime']}\n")
    rows = [[k, bu.med_range(v)] for k, v in res["wall_s"].items()]
    rows.append(["trainrun: step 1 done (metrics.jsonl row time - command start)",
                 bu.med_range(res["trainrun_first_step_logged_s"])])
    for key, label in (("started_s", "probe: interpreter up, wrapper running"),
                       ("first_step_start_s", "probe: first train_step called"),
                       ("first_step_done_s", "probe: first train_step done"),
                       ("exit_s", "probe: process exits (eval, checkpoint, plots done)")):
        rows.append([label, bu.med_range(res["probe_" + key])])
    print(bu.table(["what", "seconds"], rows))
    print("\nWhere the probe's time to the first step goes (phases, median seconds of the probe runs):\n")
    print(bu.table(["phase", "seconds"], [[k, bu.med_range(v)] for k, v in res["probe_phases_s"].items()]))
    print(f"\n`python -X importtime`: import trainrun.cli {res['importtime_cli_total_ms']:.0f} ms, import torch "
          f"{res['importtime_torch_total_ms']:.0f} ms, every import of the 1-step run "
          f"{res['importtime_run_total_ms']:.0f} ms\n")
    pk = list(res["importtime_run_by_package_ms"].items())[:12]
    print(bu.table(["package (1-step run)", "import ms (sum of its modules' self time)"], [[k, f"{v:.0f}"] for k, v in pk]))
    print()
    print(bu.table(["top-level import (1-step run)", "cumulative ms"],
                   [[i["module"], f"{i['cumulative_ms']:.0f}"] for i in res["importtime_run_top_level_ms"][:10]]))
    print(f"\nheavy modules loaded at the first training step: {', '.join(res['heavy_at_first_step'] or [])}")
    print(f"optional heavy modules never imported by the default 1-step run: "
          f"{', '.join(res['optional_heavy_never_imported'])}")
    print(f"imported only after the first step (end-of-run plots etc.): "
          f"{', '.join(res['optional_heavy_imported_after_first_step']) or 'none'}")
    print(f"imported before the first step: {', '.join(res['optional_heavy_imported_before_first_step']) or 'none'}")
    out = bu.write_json(args.out or bu.default_out("bench_startup", args.quick), record)
    print(f"raw numbers: {out}")
    return record


if __name__ == "__main__":
    main()
