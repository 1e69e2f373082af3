"""The wandb integration end to end, offline (no network): the real CLI writes runs/NAME/wandb/offline-run-*-ID/
run-ID.wandb, and the tests read those files back.

wandb 0.31 has no Python reader for .wandb files any more (the old `wandb.sdk.internal.datastore` went with the
move to wandb-core), so `wandb_records` below reads the format directly: a 7-byte header (":W&B", magic 0xBEE1,
version 0) followed by a LevelDB log (32 KiB blocks; each chunk is crc32 u32, length u16, type u8 FULL/FIRST/MIDDLE/
LAST, where the crc is zlib.crc32 over the type byte then the data), whose payloads are serialized
`wandb.proto.wandb_internal_pb2.Record` messages.
"""
import json
import math
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Dict, List

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402
from conftest import trainrun_process  # noqa: E402

BASE = ["logger=wandb", "logger.mode=offline", "logger.log_every=5", "trainer.max_steps=20", "trainer.eval_every=10",
        "model=mlp", "logger.progress=lines"]


# ---------------------------------------------------------------------------------------------- .wandb reader
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> List[pb.Record]:
    """Every Record in a .wandb file, in write order (checksums verified; a torn tail ends the list)."""
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file ({ident!r} {magic:#x} {version})"
    records, pos, parts = [], _HEADER, None
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a chunk header: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero fill / a write that did not complete
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += _HEADER + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE:
            parts.append(chunk)
            continue
        else:
            assert kind == _LAST and parts is not None, f"{path}: bad chunk type {kind} at {pos}"
            payload, parts = b"".join(parts + [chunk]), None
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # flat keys like "train/loss" arrive as a one-element nested_key


def history_rows(path: Path) -> List[Dict[str, Any]]:
    """The logged history of a .wandb file: one dict per row (key -> value, with "_step", "_timestamp", ...)."""
    return [{_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def run_config(path: Path) -> Dict[str, Any]:
    """The run config as stored: the run record's config, then any later config updates."""
    cfg: Dict[str, Any] = {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else ()
        cfg.update({_key(i): json.loads(i.value_json) for i in items})
    return cfg


def run_summary(path: Path) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            for i in r.summary.remove:
                summary.pop(_key(i), None)
    return summary


def exit_record(path: Path):
    exits = [r.exit for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    return exits[-1] if exits else None


# ---------------------------------------------------------------------------------------------- helpers
def trainrun(cwd: Path, *args: str, silent: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    if silent:
        env["WANDB_SILENT"] = "true"
    else:
        env.pop("WANDB_SILENT", None)
    assert not kw, kw
    return trainrun_process(args, cwd, env, timeout=180)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def offline_runs(run_dir: Path) -> List[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_file(offline_run: Path) -> Path:
    (f,) = offline_run.glob("run-*.wandb")
    return f


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) if isinstance(a, float) or isinstance(b, float) else a == b


# ---------------------------------------------------------------------------------------------- tests
def test_offline_run_resumes_into_the_same_wandb_run_with_aligned_steps(tmp_path):
    run_dir = tmp_path / "runs" / "w"
    ok(trainrun(tmp_path, *BASE, "run_name=w", "trainer.stop_at_step=10"))
    first = offline_runs(run_dir)
    assert len(first) == 1
    ok(trainrun(tmp_path, *BASE, "run_name=w", "resume=runs/w"))
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and first[0] in runs

    # one wandb run id across both invocations, the one every checkpoint records
    metas = [json.loads(p.read_text()) for p in sorted(run_dir.glob("checkpoints/step_*/meta.json"))]
    ids = {m["wandb_id"] for m in metas}
    assert len(metas) >= 2 and len(ids) == 1 and None not in ids, ids
    (wid,) = ids
    for r in runs:
        assert r.name.endswith(f"-{wid}"), (r.name, wid)
        assert wandb_file(r).name == f"run-{wid}.wandb"
        (run_rec,) = [x.run for x in wandb_records(wandb_file(r)) if x.WhichOneof("record_type") == "run"]
        assert (run_rec.run_id, run_rec.project, run_rec.display_name) == (wid, "trainrun", "w")

    # history: wandb's _step is trainrun's global step; train and val rows of one step merge into one row
    files = [wandb_file(r) for r in runs]  # timestamped names: first invocation first
    hist = [history_rows(f) for f in files]
    assert [h["_step"] for h in hist[0]] == [5, 10]
    assert [h["_step"] for h in hist[1]] == [15, 20]
    by_step = {h["_step"]: h for h in hist[0] + hist[1]}
    assert all("train/loss" in by_step[s] for s in (5, 10, 15, 20))
    assert [s for s in (5, 10, 15, 20) if "val/acc" in by_step[s]] == [10, 20]

    # the values are exactly the rows of metrics.jsonl
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted({r["step"] for r in rows}) == [5, 10, 15, 20]
    for row in rows:
        logged = by_step[row["step"]]
        for k, v in row.items():
            if k in ("step", "time"):
                continue
            assert close(logged[k], v), (row["step"], k, logged[k], v)

    # the resolved trainrun config is stored with the run
    for f in files:
        cfg = run_config(f)
        assert cfg["optimizer"]["name"] == "adamw" and cfg["model"]["name"] == "mlp"
        assert cfg["trainer"]["max_steps"] == 20 and cfg["logger"]["mode"] == "offline"
        assert cfg["run_name"] == "w"
    assert run_config(files[1])["resume"] == "runs/w"

    # summary: the final evaluation of each invocation; both exited cleanly
    for f, step in zip(files, (10, 20)):
        summary = run_summary(f)
        assert close(summary["val/acc"], by_step[step]["val/acc"])
        assert summary["_step"] == step
        assert exit_record(f) is not None and exit_record(f).exit_code == 0


def test_a_run_that_fails_mid_training_still_finishes_its_wandb_run(tmp_path):
    # lr 1e30 makes the loss non-finite; the loop raises FloatingPointError at the first log step.
    # WANDB_SILENT is unset here: wandb's own messages must stay on stderr, off the `progress=lines` stdout.
    p = trainrun(tmp_path, *BASE, "run_name=nan", "optimizer=sgd", "optimizer.lr=1e30", silent=False)
    assert p.returncode != 0
    assert "FloatingPointError" in p.stderr or "non-finite" in p.stderr + p.stdout
    assert not [ln for ln in p.stdout.splitlines() if ln.lower().startswith("wandb")], p.stdout  # wandb's own lines
    (run,) = offline_runs(tmp_path / "runs" / "nan")
    f = wandb_file(run)
    ex = exit_record(f)
    assert ex is not None, "wandb.finish was not called: no exit record"
    assert ex.exit_code != 0
    assert run_config(f)["optimizer"]["name"] == "sgd"


def test_disabled_mode_writes_no_wandb_directory(tmp_path):
    ok(trainrun(tmp_path, *BASE, "logger.mode=disabled", "run_name=d", "trainer.max_steps=10"))
    run_dir = tmp_path / "runs" / "d"
    assert (run_dir / "metrics.jsonl").is_file()
    assert not (run_dir / "wandb").exists()
    assert not list(tmp_path.rglob("*.wandb"))


def test_progress_bar_on_a_terminal_keeps_wandb_console_capture(tmp_path):
    """With a terminal, rich's progress bar swaps sys.stdout for a proxy while it runs; wandb must be set up
    before that, or its console capture (output.log) is silently lost for the whole run."""
    if not hasattr(os, "openpty"):
        pytest.skip("needs a pty")
    master, slave = os.openpty()
    chunks: List[bytes] = []

    def drain():  # keep the pty from filling up
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                return
            if not b:
                return
            chunks.append(b)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TERM": "xterm", "COLUMNS": "120"}
    try:
        p = subprocess.run([sys.executable, "-m", "trainrun", *BASE[:-1], "logger.progress=bar", "run_name=bar",
                            "trainer.max_steps=10"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                           stderr=subprocess.PIPE, timeout=180)
    finally:
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    (run,) = offline_runs(tmp_path / "runs" / "bar")
    f = wandb_file(run)
    lines = [r.output_raw.line for r in wandb_records(f) if r.WhichOneof("record_type") == "output_raw"]
    assert any("run dir:" in line for line in lines), lines[:5]
    assert [h["_step"] for h in history_rows(f)] == [5, 10]
    assert exit_record(f).exit_code == 0
