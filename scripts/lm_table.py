"""The language-model table of README "Language models": the stdlib GPT with WSD and with cosine at the same
budget (seeds), and its LoRA adaptation to Python's English documentation, with the perplexity before and after.

Runs (in the current directory; a finished run is not run again):
  trainrun +recipe=gpt_tiny_stdlib seed=S          (seed 0 keeps the recipe's run name: the LoRA source)
  trainrun +recipe=gpt_tiny_stdlib_cosine seed=S
  trainrun +recipe=gpt_tiny_pydoc_lora    (trainer.eval_at_start: its step-0 evaluation is the stdlib model on the
                                          English val blocks, "before"; LoRA's B starts at 0; the final one "after")
  trainrun +recipe=gpt_tiny_pydoc_lora finetune=off model.weights=null    (the same 300 steps from scratch)
and prints a markdown table: final val loss and perplexity, tokens/s (median of the logged windows), wall time.

    python scripts/lm_table.py [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

QUIET = ["logger.plots=false", "logger.progress=lines"]


def train(run_name: str, *args: str) -> Dict[str, float]:
    run = Path("runs") / run_name
    if not (run / "wall_s.txt").is_file():  # written once the run finished
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainrun", *args, f"run_name={run_name}", *QUIET], check=True,
                       stdout=subprocess.DEVNULL)
        (run / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return numbers(run)


def numbers(run: Path) -> Dict[str, float]:
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [m for m in logs if "val/loss" in m]
    final = evals[-1]
    rates = [m["tokens_per_s"] for m in logs if "tokens_per_s" in m]
    return {"val_loss": final["val/loss"], "val_ppl": final["val/ppl"], "step": final["step"],
            "tokens_per_s": statistics.median(rates) if rates else float("nan"),
            "wall_s": float((run / "wall_s.txt").read_text()),
            "start": {"val_loss": evals[0]["val/loss"], "val_ppl": evals[0]["val/ppl"]} if evals[0]["step"] == 0
            else None}


def row(label: str, recipe: str, runs: List[Dict[str, float]], steps: str) -> Dict[str, object]:
    losses = [r["val_loss"] for r in runs]
    return {"row": label, "recipe": recipe, "steps": steps, "val_loss": statistics.mean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0, "per_seed": losses,
            "val_ppl": statistics.mean(r["val_ppl"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs)}


def markdown(rows: List[Dict[str, object]]) -> str:
    out = ["| run | recipe | steps | val loss (nats/token) | val ppl | per seed | tokens/s | wall time |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['val_loss']:.4f}" + (f" ± {r['val_loss_std']:.4f}" if len(r["per_seed"]) > 1 else "")
        seeds = ", ".join(f"{v:.4f}" for v in r["per_seed"])
        out.append(f"| {r['row']} | `{r['recipe']}` | {r['steps']} | {loss} | {r['val_ppl']:.3f} | {seeds} | "
                   f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} s |")
    return "\n".join(out)


def main(argv=None) -> List[Dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the WSD and cosine rows")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    wsd = [train("gpt_tiny_stdlib" if s == 0 else f"gpt_tiny_stdlib_s{s}", "+recipe=gpt_tiny_stdlib", f"seed={s}")
           for s in seeds]
    cosine = [train(f"gpt_tiny_stdlib_cosine_s{s}", "+recipe=gpt_tiny_stdlib_cosine", f"seed={s}") for s in seeds]
    if 0 not in seeds:
        train("gpt_tiny_stdlib", "+recipe=gpt_tiny_stdlib", "seed=0")
    after = train("gpt_tiny_pydoc_lora", "+recipe=gpt_tiny_pydoc_lora")
    before = {**after, **after["start"], "tokens_per_s": float("nan"), "wall_s": float("nan")}
    scratch = train("pydoc_scratch", "+recipe=gpt_tiny_pydoc_lora", "finetune=off", "model.weights=null",
                    "trainer.eval_at_start=false")
    rows = [row("stdlib code, WSD", "gpt_tiny_stdlib", wsd, "1,200"),
            row("stdlib code, cosine (same budget)", "gpt_tiny_stdlib_cosine", cosine, "1,200"),
            row("pydoc English, before: the stdlib model (step 0)", "gpt_tiny_pydoc_lora", [before], "0"),
            row("pydoc English, LoRA rank 8", "gpt_tiny_pydoc_lora", [after], "300"),
            row("pydoc English, from scratch (same steps)", "gpt_tiny_pydoc_lora finetune=off model.weights=null",
                [scratch], "300")]
    print(markdown(rows))
    Path("lm_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
