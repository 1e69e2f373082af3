"""mode=predict: the checkpoint's predictions for every sample of one split of the configured data.

`predict.split` = test (falls back to val, with a warning, when the data has no test split) | val | train;
`predict.output` = a .csv or .jsonl path (default predictions.csv in this mode's directory, RUN/predict/<time>).
One row per sample, in split order: index, target, then the task's columns: classification: label, class_name,
prob_<class> per class; binary: label, prob; multilabel: labels (the positive classes, ';'-joined), prob_<class>;
other tasks: output_<i> per model output. The EMA weights when the checkpoint has them; LoRA merged.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from trainrun.data import BatchStream
from trainrun.errors import ConfigError, DataError
from trainrun.inference import inference_module, interpret
from trainrun.logging import console

log = logging.getLogger("trainrun")

SPLITS = ("train", "val", "test")
FORMATS = (".csv", ".jsonl")


def predict_mode(run, t0: float) -> Dict[str, Any]:
    cfg = run.cfg
    if run.task.token_weighted:
        raise ConfigError(f"mode=predict writes one row per sample, and a {cfg.task.name} model gives "
                          f"{run.task.num_outputs:,} next-token logits per block; use mode=generate (a sample) or "
                          "mode=eval / mode=test (loss and perplexity)")
    output = _output_path(cfg.predict.output, run.dir)
    name, dataset = _split(run)
    lora = run.finetuner is not None and cfg.finetune.lora_rank > 0
    model, weights = inference_module(run.model, run.resumed.state, "auto", lora, where=f"checkpoint {run.resumed.dir}")
    rows = _rows(run, model, dataset)
    n = _write(output, rows)
    if run.info.is_main:
        console().print(f"predictions of {run.resumed.dir} (step {run.resumed.meta['step']}, {weights} weights) on "
                        f"the {name} split: {n} rows written to {output}", markup=False)
    return {"rows": n, "finished": True}


def _output_path(output: Optional[str], run_dir: Path) -> Path:
    path = Path(output) if output else Path(run_dir) / "predictions.csv"
    if path.suffix not in FORMATS:
        raise ConfigError(f"predict.output={output}: the suffix picks the format, use .csv or .jsonl "
                          f"(e.g. predict.output={path.with_suffix('.csv')})")
    if path.is_dir():
        raise ConfigError(f"predict.output={output} is a directory; name a file, e.g. {path / 'predictions.csv'}")
    return path


def _split(run):
    name = run.cfg.predict.split
    if name not in SPLITS:
        raise ConfigError(f"predict.split={name}: use one of {', '.join(SPLITS)}")
    dataset = getattr(run.split, name, None)
    if name == "test" and dataset is None:
        log.warning("predict.split=test: the data has no test split (data.test_fraction=0 or no test/ folder): "
                    "predicting the val split instead")
        name, dataset = "val", run.split.val
    if dataset is None or len(dataset) == 0:
        raise DataError(f"predict.split={name}: the data's {name} split is empty; pick another split")
    return name, dataset


@torch.no_grad()
def _rows(run, model, dataset) -> Iterator[Dict[str, Any]]:
    cfg, device = run.cfg, run.device
    task = "user" if cfg.task.get("_target_") else cfg.task.name
    stream = BatchStream(dataset, cfg.data.eval_batch_size, cfg.seed, shuffle=False, drop_last=False,
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                         persistent_workers=False, prefetch_factor=cfg.data.prefetch_factor)
    names = run.split.class_names or [str(k) for k in range(run.task.num_outputs)]
    for x, y, idx in stream.iter_epoch(0):
        out = model(x.to(device)).float().cpu()
        labels, probs = interpret(out, task, float(cfg.task.get("threshold", 0.5)))
        for i in range(len(out)):
            row = {"index": int(idx[i]), "target": _plain(y[i])}
            if task == "classification":
                row.update(label=int(labels[i]), class_name=names[int(labels[i])],
                           **{f"prob_{c}": float(p) for c, p in zip(names, probs[i])})
            elif task == "binary":
                row.update(label=int(labels[i]), prob=float(probs[i]))
            elif task == "multilabel":
                row.update(labels=";".join(c for c, on in zip(names, labels[i]) if on),
                           **{f"prob_{c}": float(p) for c, p in zip(names, probs[i])})
            else:
                row.update({f"output_{k}": float(v) for k, v in enumerate(out[i].reshape(-1))})
            yield row


def _plain(value: torch.Tensor) -> Any:
    return value.item() if value.numel() == 1 else value.tolist()


def _write(path: Path, rows: Iterator[Dict[str, Any]]) -> int:
    """Written to a temporary file then renamed: a failure leaves no half-written predictions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", newline="") as f:
            writer = None
            for row in rows:
                if path.suffix == ".jsonl":
                    f.write(json.dumps(row) + "\n")
                else:
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
