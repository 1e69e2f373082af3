"""The fine-tuning table of README "Fine-tuning": MNIST -> 100 labelled digits, five ways, seeds 0-4.

Runs (in the current directory) the source recipe `mnist5k_teacher_cnn` once if runs/mnist5k_teacher is missing,
then one named sweep per row (`trainrun -m +recipe=digits100_ROW seed=0,1,2,3,4`; re-running skips finished
jobs), and prints a markdown table: final val accuracy mean +- std over the seeds, trainable parameters, and the
median training time per optimizer step (from the runs' logged throughput, evaluation excluded).

    python scripts/transfer_table.py [--seeds 0,1,2,3,4] [--rows scratch,full,...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

ROWS = {"scratch": "from scratch", "full": "full fine-tune", "linear_probe": "linear probe", "lora": "LoRA (rank 8)",
        "layer_decay": "full, layer-wise LR decay 0.75"}
QUIET = ["logger.plots=false", "logger.progress=lines", "logger.log_every=5"]


def trainrun(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "trainrun", *args, *QUIET], check=True, stdout=subprocess.DEVNULL)


def job_numbers(job: Path) -> Dict[str, float]:
    """One job's final val/acc, trainable parameters and median seconds per step."""
    result = json.loads((job / "result.json").read_text())
    if result.get("status") != "completed":
        raise SystemExit(f"{job}: job {result.get('status')}: {result.get('error')}")
    meta = json.loads(sorted((job / "checkpoints").glob("step_*/meta.json"))[-1].read_text())
    batch = meta["config"]["resolved"]["data"]["batch_size"]
    logs = [json.loads(l) for l in (job / "metrics.jsonl").read_text().splitlines() if l.strip()]
    step_s = [batch / m["samples_per_s"] for m in logs if m.get("samples_per_s")]
    # the parameters that trained are those with AdamW state (exp_avg) in the final checkpoint: frozen ones have none
    final = sorted((job / "checkpoints").glob("step_*"))[-1]
    optimizer = torch.load(final / "state.pt", map_location="cpu", weights_only=True)["optimizer"]
    trainable = sum(entry["exp_avg"].numel() for entry in optimizer["state"].values())
    return {"acc": result["metrics"]["val/acc"], "step_ms": 1000 * statistics.median(step_s), "trainable": trainable}


def row(name: str, seeds: str) -> Dict[str, object]:
    trainrun("-m", f"+recipe=digits100_{name}", f"seed={seeds}", f"sweep_name=digits100_{name}")
    jobs = [job_numbers(d) for d in sorted(Path("multirun", f"digits100_{name}").iterdir())
            if (d / "result.json").is_file()]
    accs = [100 * j["acc"] for j in jobs]
    return {"row": ROWS[name], "recipe": f"digits100_{name}", "accs": accs, "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "step_ms": statistics.median(j["step_ms"] for j in jobs), "trainable": jobs[0]["trainable"]}


def markdown(rows: List[Dict[str, object]]) -> str:
    out = ["| start | recipe | val acc (mean ± std) | per seed | trainable params | ms / step |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = " / ".join(f"{a:.1f}" for a in r["accs"])
        out.append(f"| {r['row']} | `{r['recipe']}` | {r['mean']:.2f} ± {r['std']:.2f}% | {per_seed} | "
                   f"{r['trainable']:,} | {r['step_ms']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rows", default=",".join(ROWS))
    args = ap.parse_args()
    if not Path("runs", "mnist5k_teacher", "checkpoints", "latest").exists():
        trainrun("+recipe=mnist5k_teacher_cnn")
    rows = [row(name, args.seeds) for name in args.rows.split(",")]
    print(markdown(rows))
    Path("transfer_table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
