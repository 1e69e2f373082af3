"""One command for a lent GPU: ResNet-50 bf16 channels_last training throughput, trainrun's loop vs a hand-written
loop, eager and torch.compile, peak memory, the NaN guard's cost, and a 2-process run where 2 GPUs exist. JSON out.

    python scripts/gpu_check.py                  # ResNet-50, 224 px, batch 128, bf16, channels_last, compile too
    python scripts/gpu_check.py --tiny           # ResNet-18, 32 px, batch 8, 3 steps, no compile: runs on a CPU
                                                 # (fp32 there unless --precision bf16)

What is measured (synthetic data: trainrun's data=synthetic, Gaussian class clusters held in CPU memory, copied to
the device batch by batch in both loops; the ResNets with their ImageNet stem, model.small_input=false):
  trainrun   the Run that trainrun.build makes from the composed config (data=synthetic model=resnet50
             precision=bf16 trainer.channels_last=true [trainer.compile=true]), trained by trainrun.loop.fit - the
             loop a user's run executes, guard on (doctor.nan_guard=halt, the default), logging every
             logger.log_every steps into a no-op logger, no eval or checkpoint inside the window.
  hand       the same model and optimizer objects (a second trainrun.build), trained by zero_grad -> autocast bf16
             forward -> cross-entropy -> backward -> step, with no host sync at all [torch.compile(model)].
  guard      trainrun eager with doctor.nan_guard=off (and each doctor.guard_sync mode where trainrun has that key):
             the guard's cost is 1 - (images/s on) / (images/s off), its share of a step.
Timing: `--warmup` steps, then `--reps` windows of `--steps` steps, each between two device synchronisations;
images/s is the median window. Peak memory: torch.cuda.max_memory_allocated per variant (reset before it is built);
on a CPU the process's peak RSS so far (ru_maxrss, a high-water mark of the whole script). cudnn.benchmark and
deterministic kernels follow `--determinism` (trainrun's `determinism` key; default off here: fastest kernels).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FULL = {"model": "resnet50", "image_size": 224, "batch": 128, "warmup": 10, "steps": 20, "reps": 3, "classes": 100}
TINY = {"model": "resnet18", "image_size": 32, "batch": 8, "warmup": 1, "steps": 3, "reps": 1, "classes": 10}


_COMPOSED: Dict[tuple, Any] = {}


def compose(overrides: List[str], extra: List[str] = ()):
    """The config a command line with `overrides` gets (composed once), with the `extra` dotted keys set on a copy:
    Hydra's compose costs seconds and the variants differ only in a key or two."""
    from omegaconf import OmegaConf

    key = tuple(overrides)
    if key not in _COMPOSED:
        from hydra import compose as hcompose, initialize_config_dir

        from trainrun.cli import CONFIGS_DIR, setup

        if not _COMPOSED:
            setup()
        with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="gpu_check"):
            _COMPOSED[key] = hcompose("config", overrides=list(overrides))
    cfg = copy.deepcopy(_COMPOSED[key])
    for item in extra:  # as strings: the schema converts them (YAML would read `off` as false)
        name, value = item.split("=", 1)
        OmegaConf.update(cfg, name, value, merge=False)
    return cfg


def overrides(s: Dict[str, Any], compiled: bool) -> List[str]:
    total = s["warmup"] + s["reps"] * s["steps"]
    # enough samples for a few batches (epochs repeat them), val the minimum the split needs
    n = max(4 * s["batch"], 2 * s["batch"] + 8) * 5 // 4
    return ["data=synthetic", f"data.input_shape=[3,{s['image_size']},{s['image_size']}]", f"data.num_samples={n}",
            f"data.num_classes={s['classes']}", f"data.batch_size={s['batch']}", f"model={s['model']}",
            "model.small_input=false", f"precision={s['precision']}", "trainer.channels_last=true",
            f"trainer.compile={str(compiled).lower()}",
            f"trainer.max_steps={total + 1}", f"determinism={s['determinism']}", "logger.plots=false",
            "optimizer=sgd", "seed=0", f"trainer.device={'cpu' if s['device'] == 'cpu' else 'auto'}"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        return {"kind": "torch.cuda.max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"kind": "process peak RSS (ru_maxrss; high-water mark of the whole script so far)",
            "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def reset_memory(device: torch.device) -> None:
    gc.collect()  # the previous variant's Run, model and optimizer state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_run(s: Dict[str, Any], compiled: bool, extra: List[str], run_dir: Path):
    from trainrun.build import build
    from trainrun.config import validate
    from trainrun.seed import set_determinism

    cfg = compose(overrides(s, compiled), extra)
    validate(cfg)
    set_determinism(cfg.determinism)
    return build(cfg, run_dir)


def windows(step_to: Callable[[int], None], device: torch.device, s: Dict[str, Any]) -> List[float]:
    """Images/s of each measured window; step_to(k) trains until k optimizer steps are done."""
    step_to(s["warmup"])
    rates = []
    for r in range(s["reps"]):
        sync(device)
        t0 = time.perf_counter()
        step_to(s["warmup"] + (r + 1) * s["steps"])
        sync(device)
        rates.append(s["steps"] * s["batch"] / (time.perf_counter() - t0))
    return rates


def trainrun_stepper(run) -> Callable[[int], None]:
    """trainrun.loop.fit up to a step, with a logger that does nothing and no eval/checkpoint before the end."""
    from trainrun.loop import fit

    never = 10 ** 12
    log_every = int(run.cfg.logger.log_every)

    def step_to(k: int) -> None:
        fit(run.trainer, log_every=log_every, eval_every=never, ckpt_every=never, stop_at=k,
            log=lambda step, metrics: None, on_eval=lambda metrics: None, save=lambda: None,
            advance=lambda step: None, should_stop=lambda: False)
    return step_to


def hand_stepper(run, compiled: bool) -> Callable[[int], None]:
    """A plain PyTorch loop on the Run's model and optimizer (trainrun's data order does not matter for speed)."""
    model, opt, device = run.model, run.trainer.optimizer, run.device
    net = torch.compile(model) if compiled else model
    x_all, y_all = run.split.train.x, run.split.train.y
    batch, n = run.cfg.data.batch_size, len(y_all)
    state = {"step": 0}
    model.train()

    def step_to(k: int) -> None:
        while state["step"] < k:
            lo = (state["step"] * batch) % (n - batch + 1)
            x = x_all[lo:lo + batch].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y_all[lo:lo + batch].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.cfg.precision.name == "bf16"):
                logits = net(x)
            F.cross_entropy(logits.float(), y).backward()
            opt.step()
            state["step"] += 1
    return step_to


def measure(name: str, s: Dict[str, Any], kind: str, compiled: bool, extra: List[str]) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as d:
        dev = torch.device("cuda") if torch.cuda.is_available() and s["device"] != "cpu" else torch.device("cpu")
        reset_memory(dev)
        t0 = time.perf_counter()
        run = build_run(s, compiled, extra, Path(d))
        step_to = trainrun_stepper(run) if kind == "trainrun" else hand_stepper(run, compiled)
        rates = windows(step_to, run.device, s)
        res = {"loop": kind, "compile": compiled, "overrides": extra, "images_per_s": statistics.median(rates),
               "images_per_s_windows": rates, "ms_per_step": 1000 * s["batch"] / statistics.median(rates),
               "peak_memory": peak_memory(run.device), "wall_s": time.perf_counter() - t0}
        print(f"  {name}: {res['images_per_s']:.1f} images/s ({res['ms_per_step']:.1f} ms/step)", file=sys.stderr)
        del run, step_to
    return res


def guard_variants() -> Dict[str, List[str]]:
    """trainrun eager variants for the guard's cost: off, and each sync mode where trainrun has doctor.guard_sync."""
    from trainrun.config import DoctorConfig

    out = {"trainrun_guard_off": ["doctor.nan_guard=off"]}
    if "guard_sync" in DoctorConfig.__dataclass_fields__:
        for mode in ("step", "deferred"):
            out[f"trainrun_guard_{mode}"] = [f"doctor.guard_sync={mode}"]
    return out


def two_process(s: Dict[str, Any], force_cpu: bool) -> Dict[str, Any]:
    """torchrun with 2 processes (nccl on 2 GPUs; gloo on the CPU only when forced): exit code and throughput."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if s["device"] == "cpu" and not force_cpu:
        return {"skipped": "--device cpu: the 2-process check runs on 2 GPUs (or with --two-process-on-cpu)"}
    if gpus < 2 and not force_cpu:
        return {"skipped": f"needs 2 GPUs, found {gpus}"}
    device = "cuda" if gpus >= 2 and s["device"] != "cpu" else "cpu"
    steps = s["warmup"] + s["reps"] * s["steps"]
    args = [a for a in overrides(s, False) if not a.startswith(("trainer.max_steps", "trainer.compile"))]
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainrun",
               "run_name=ddp", *args, f"trainer.max_steps={steps}", f"trainer.device={device}",
               f"logger.log_every={max(1, steps // 2)}", "logger.progress=lines", f"trainer.eval_every={steps}",
               f"trainer.ckpt_every={steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=1800)
        rows = []
        metrics = Path(d) / "runs" / "ddp" / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
        return {"backend": "nccl" if device == "cuda" else "gloo", "world": 2, "returncode": p.returncode,
                "ok": p.returncode == 0 and bool(rates), "steps": steps, "wall_s": time.perf_counter() - t0,
                "samples_per_s_last_window": rates[-1] if rates else None,
                "output_tail": (p.stdout + p.stderr)[-1500:] if p.returncode else ""}


def machine() -> Dict[str, Any]:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def ratios(res: Dict[str, Any]) -> Dict[str, Any]:
    def rate(name: str) -> Optional[float]:
        return res.get(name, {}).get("images_per_s")

    out: Dict[str, Any] = {}
    for mode in ("eager", "compile"):
        a, b = rate(f"trainrun_{mode}"), rate(f"hand_{mode}")
        out[f"trainrun_over_hand_{mode}"] = a / b if a and b else None
    off = rate("trainrun_guard_off")
    # the guard's share of a step: 1 - t_off / t_on = 1 - (images/s on) / (images/s off)
    for name in ("trainrun_eager", "trainrun_guard_step", "trainrun_guard_deferred"):
        on = rate(name)
        if on and off:
            out["guard_cost_share" + ("" if name == "trainrun_eager" else name[len("trainrun_guard"):])] = 1 - on / off
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="ResNet-18 at 32 px, batch 8, 3 steps, no compile (CPU)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    for key in ("batch", "steps", "warmup", "reps", "image_size"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default bf16; --tiny on a CPU: fp32 (bf16 autocast without the CPU's bf16 instructions "
                        "runs 10-20x slower than fp32, measured on this project's 2-core AMD EPYC)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; --tiny on a CPU: 1, steadier on a shared machine)")
    p.add_argument("--determinism", choices=("off", "warn", "error"), default="off")
    p.add_argument("--two-process-on-cpu", action="store_true",
                   help="run the 2-process check with gloo on the CPU when fewer than 2 GPUs exist")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    s = dict(TINY if a.tiny else FULL)
    s.update({k: v for k, v in vars(a).items() if k in s and v is not None})
    on_gpu = torch.cuda.is_available() and a.device != "cpu"
    s.update(device=a.device, determinism=a.determinism,
             precision=a.precision or ("fp32" if a.tiny and not on_gpu else "bf16"))
    compiled = a.compile if a.compile is not None else not a.tiny
    threads = a.threads or (1 if a.tiny and not on_gpu else None)
    if threads:
        torch.set_num_threads(threads)
    s["threads"] = torch.get_num_threads()
    torch.manual_seed(0)
    variants = {"trainrun_eager": ("trainrun", False, []), "hand_eager": ("hand", False, [])}
    variants.update({name: ("trainrun", False, extra) for name, extra in guard_variants().items()})
    if compiled:
        variants.update({"trainrun_compile": ("trainrun", True, []), "hand_compile": ("hand", True, [])})
    results: Dict[str, Any] = {}
    for name, (kind, comp, extra) in variants.items():
        results[name] = measure(name, s, kind, comp, extra)
    if not compiled:
        results["compile"] = {"skipped": "--tiny runs without torch.compile; add --compile to include it"}
    record = {"check": "gpu_check", "settings": {**s, "channels_last": True, "compile": compiled},
              "machine": machine(), "results": results, "ratios": ratios(results),
              "two_process": two_process(s, a.two_process_on_cpu)}
    text = json.dumps(record, indent=2, default=str)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return record


if __name__ == "__main__":
    main()
