"""mode=test: the checkpoint the validation metric selected, evaluated once on the held-out test split.

`resume=RUN` (a run directory, or `latest`) evaluates the run's `best` checkpoint (its `latest` when the run kept no
best); `resume=RUN/checkpoints/step_N` evaluates that checkpoint. Training, checkpoint selection, early stopping and
sweeps never read the test split; this mode only reports on it. The result goes to RUN/test.json (the run's test
result: the sweep summary reads it) and to test.json inside the checkpoint's folder, next to the files whose SHA256
are the checkpoint's identity (meta.json and state.pt are never rewritten).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Tuple

from trainrun import checkpoint
from trainrun.data import BatchStream
from trainrun.errors import CheckpointError, DataError
from trainrun.logging import console, print_metrics
from trainrun.loop import evaluate_all
from trainrun.regularization import EMA

log = logging.getLogger("trainrun")

RESULT = "test.json"  # RUN/test.json and checkpoints/step_N/test.json


def test_mode(run, t0: float) -> Dict[str, Any]:
    if run.split.test is None:
        raise DataError(no_test_split_message(run.cfg.data))
    ckpt_dir, state, meta, selected_by = selected_checkpoint(run)
    trained_on = (meta.get("data") or {}).get("fingerprint")
    if trained_on not in (None, run.split.fingerprint):
        log.warning("the data differs from the data %s was trained on (fingerprint %s, now %s): the test split may "
                    "not be the one held out from it", ckpt_dir, str(trained_on)[:12], run.split.fingerprint[:12])
    _load_weights(run, ckpt_dir, state)
    metrics = evaluate_test(run)
    record = {"checkpoint": str(ckpt_dir), "selected_by": selected_by, "sha256": meta["sha256"],
              "step": meta["step"], "monitor": _trained_monitor(meta), "monitor_value": meta.get("monitor_value"),
              "weights": "ema" if "ema" in state else "raw", "test_samples": len(run.split.test),
              "data_fingerprint": run.split.fingerprint, "trained_data_fingerprint": trained_on,
              "class_names": run.split.class_names, "metrics": metrics,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if run.info.is_main:
        record_result(ckpt_dir, record)
        con = console()
        print_metrics(con, f"test of {ckpt_dir} ({selected_by}, step {meta['step']}): "
                           f"{len(run.split.test)} test samples", {"step": meta["step"], **metrics})
        if run.split.class_names:
            con.print(f"classes: {', '.join(run.split.class_names)}", markup=False)
        con.print(f"test result written to {Path(ckpt_dir).parent.parent / RESULT}", markup=False)
    return {**metrics, "finished": True}


def _trained_monitor(meta: Dict[str, Any]) -> Any:
    """The validation metric the run selected its checkpoints on (its stored config; this command's may differ)."""
    section = meta["config"]["resolved"].get("checkpoint")
    return section.get("monitor") if isinstance(section, dict) else None


def no_test_split_message(data) -> str:
    """Where a test split comes from, for the data this run was trained on."""
    if data.get("_target_"):
        return (f'mode=test: data._target_={data._target_} returns no "test" dataset; return {{"train": ..., '
                '"val": ..., "test": ...}} (or a third tuple entry) from the factory')
    if data.name == "imagefolder":
        return (f"mode=test: data=imagefolder {data.root} has no test split; add a test/ folder of class folders "
                "next to train/ (images the run never saw), or train on a folder of class folders with "
                "data.test_fraction")
    return (f"mode=test: data={data.name} has no test split: the run was trained with data.test_fraction="
            f"{data.get('test_fraction') or 0}, so every sample was train or val; train a new run with "
            "data.test_fraction (e.g. 0.2): a test split carved out afterwards would hold samples it trained on")


def selected_checkpoint(run) -> Tuple[Path, Dict[str, Any], Dict[str, Any], str]:
    """(folder, state, meta, how it was chosen: "named" | "best" | "latest"). The `best` checkpoint is loaded with
    the same SHA256 verification as a resume; a bad one is refused, never replaced by another checkpoint."""
    resumed = run.resumed
    spec = Path(str(run.cfg.resume))
    if (spec / checkpoint.STATE).is_file() or (spec / checkpoint.META).is_file():
        return resumed.dir, resumed.state, resumed.meta, "named"
    best = checkpoint.read_pointer(checkpoint.run_dir_of(resumed.dir), "best")
    if best is None:
        return resumed.dir, resumed.state, resumed.meta, "latest"
    if best.resolve() == Path(resumed.dir).resolve():
        return resumed.dir, resumed.state, resumed.meta, "best"
    state, meta = checkpoint.load(best)
    return best, state, meta, "best"


def _load_weights(run, ckpt_dir: Path, state: Dict[str, Any]) -> None:
    """The checkpoint's weights, and its EMA weights when it has them (what its val/* metrics were measured on)."""
    try:
        run.model.load_state_dict(state["model"])
        if "ema" in state:
            run.trainer.ema = run.trainer.ema or EMA(run.model, 0.0)
            run.trainer.ema.load_state_dict(state["ema"])
    except (KeyError, RuntimeError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the run's model ({why}); test another checkpoint "
                              "with resume=RUN/checkpoints/step_N") from e


def evaluate_test(run) -> Dict[str, float]:
    """The task's metrics over the whole test split, exactly as validation computes them (loop.evaluate_all),
    renamed test/* (test_raw/*: the raw weights when the checkpoint has EMA weights)."""
    data, trainer = run.cfg.data, run.trainer
    trainer.val = BatchStream(run.split.test, data.eval_batch_size, run.cfg.seed, shuffle=False, drop_last=False,
                              num_workers=data.num_workers, pin_memory=run.device.type == "cuda",
                              persistent_workers=data.persistent_workers, prefetch_factor=data.prefetch_factor)
    metrics = evaluate_all(trainer)
    return {_test_name(k): v for k, v in metrics.items()}


def _test_name(name: str) -> str:
    for old, new in (("val_raw/", "test_raw/"), ("val/", "test/")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def record_result(ckpt_dir: Path, record: Dict[str, Any]) -> None:
    """RUN/test.json and checkpoints/step_N/test.json, each written whole or not at all; and, for a job of a sweep,
    the sweep's summary again (it reports the test metric of the job the validation metric selects)."""
    run_dir = checkpoint.run_dir_of(ckpt_dir)
    previous = _read_json(run_dir / RESULT)
    if previous and previous.get("sha256") != record["sha256"]:
        log.warning("the test split was already evaluated on another checkpoint of this run (%s); report the one "
                    "the validation metric selects: choosing between checkpoints on test results tunes on the test "
                    "split", previous.get("checkpoint"))
    text = json.dumps(record, indent=2, default=str)
    _write_atomic(run_dir / RESULT, text, run_dir)
    # A checkpoint load refuses a folder holding a file its manifest does not list, except the records
    # trainrun.checkpoint admits (RECORDS): only then may the result sit in the folder without breaking the checkpoint.
    if RESULT in getattr(checkpoint, "RECORDS", ()):
        _write_atomic(ckpt_dir / RESULT, text, ckpt_dir.parent)  # the temporary file never sits in the folder
    else:
        log.warning("the result is not recorded inside %s: this trainrun's checkpoint loader would refuse the folder "
                    "with an unlisted %s in it", ckpt_dir, RESULT)
    if (run_dir.parent / "summary.json").is_file():
        from trainrun.sweep import refresh_summary

        refresh_summary(run_dir.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str, scratch_dir: Path) -> None:
    tmp = scratch_dir / f".{path.parent.name}-{path.name}-{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
