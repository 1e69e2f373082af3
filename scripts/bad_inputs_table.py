"""Run a table of bad inputs through the real CLI and write docs/bad_inputs.md with what trainrun answers.

Each case runs `python -m trainrun ...` in its own temporary directory (WANDB_MODE=disabled), exactly as a user
would, and the table records the exit code and the stderr line it actually printed: nothing here is written by
hand except the case descriptions. Usage: python scripts/bad_inputs_table.py [--out docs/bad_inputs.md]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger.progress=lines", "logger.plots=false"]
CKPT = "runs/ok/checkpoints/step_000000002"


def trainrun(cwd: Path, args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "trainrun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- fixtures a case may need in its directory ------------------------------------------------------------
def tensors(cwd: Path, name: str, *, nan=False, label_max=None, negative=False, float_labels=False) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = torch.arange(64) % 3
    if nan:
        x[5, 0, 2, 2] = float("nan")
    if label_max is not None:
        y = torch.arange(64) % (label_max + 1)
    if negative:
        y[7] = -1
    if float_labels:
        y = y.float()
    torch.save({"x": x, "y": y}, cwd / name)


def labels_file(cwd: Path, name: str, y: torch.Tensor, shape=(1, 4, 4)) -> None:
    """A tensors file of 64 random inputs with the given labels (one class, a label of 10**9, complex labels)."""
    torch.save({"x": torch.randn(64, *shape, generator=torch.Generator().manual_seed(0)), "y": y}, cwd / name)


def big_label(cwd: Path) -> None:
    y = torch.arange(64) % 3
    y[5] = 10**9
    labels_file(cwd, "big.pt", y)


def image_folder_with_a_text_png(cwd: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (cwd / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(cwd / "imgs" / c / f"{i}.png")
    (cwd / "imgs" / "b" / "notes.png").write_text("not an image\n")


def not_a_torch_file(cwd: Path, name: str) -> None:
    (cwd / name).write_text("this is not a tensor file\n")


def flip_a_bit(cwd: Path) -> None:
    state = cwd / CKPT / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))


def truncate(cwd: Path) -> None:
    state = cwd / CKPT / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])


def tamper_sha(cwd: Path) -> None:
    (cwd / CKPT / "state.pt.sha256").write_text(hashlib.sha256(b"tampered").hexdigest() + "  state.pt\n")


def delete_sha(cwd: Path) -> None:
    (cwd / CKPT / "state.pt.sha256").unlink()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def code_executing_pickle(cwd: Path) -> None:
    """A torch checkpoint whose pickle calls os.system, with a matching .sha256 and meta.json (a forged file)."""
    buf = io.BytesIO()
    torch.save({"model": _RunsCode()}, buf)
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    (cwd / CKPT / "state.pt").write_bytes(buf.getvalue())
    (cwd / CKPT / "state.pt.sha256").write_text(f"{sha}  state.pt\n")
    meta = json.loads((cwd / CKPT / "meta.json").read_text())
    (cwd / CKPT / "meta.json").write_text(json.dumps({**meta, "sha256": sha}))


# (what is wrong, trainrun arguments, setup(cwd) or None, needs the trained run `runs/ok`); a resume repeats the
# run's overrides (model=mlp), as a resume must, so that the checkpoint itself is what gets checked
CASES = [
    ("unknown config key (typo)", ["optimizer.lrr=0.1"], None, False),
    ("unknown key added with +", ["+unknown=1"], None, False),
    ("unknown nested key added with +", ["+optimizer.lrr=0.1"], None, False),
    ("wrong type", ["optimizer.lr=abc"], None, False),
    ("unknown group option", ["optimizer=foo"], None, False),
    ("unknown recipe", ["+recipe=nope"], None, False),
    ("negative learning rate", ["optimizer.lr=-0.1"], None, False),
    ("label smoothing out of range", ["regularization.label_smoothing=1.5"], None, False),
    ("batch size 0", ["data.batch_size=0"], None, False),
    ("dropout out of range", ["model=mlp", "model.dropout=1.0"], None, False),
    ("unknown device", ["trainer.device=tpu"], None, False),
    ("inconsistent options: both gradient clippings",
     ["regularization.clip_grad_norm=1.0", "regularization.clip_grad_value=0.5"], None, False),
    ("inconsistent options: two warmups", ["schedule.warmup_steps=10", "schedule.warmup_fraction=0.1"], None, False),
    ("constant initialisation (symmetry)", ["init=zeros"], None, False),
    ("data file with NaN", ["data=tensors", "data.root=nan.pt"], lambda d: tensors(d, "nan.pt", nan=True), False),
    ("labels out of range for data.num_classes", ["data=tensors", "data.root=five.pt", "data.num_classes=3"],
     lambda d: tensors(d, "five.pt", label_max=4), False),
    ("negative labels", ["data=tensors", "data.root=neg.pt"], lambda d: tensors(d, "neg.pt", negative=True), False),
    ("float labels", ["data=tensors", "data.root=flt.pt"], lambda d: tensors(d, "flt.pt", float_labels=True), False),
    ("missing data file", ["data=tensors", "data.root=missing.pt"], None, False),
    ("data file that is not a tensor file", ["data=tensors", "data.root=junk.pt"],
     lambda d: not_a_torch_file(d, "junk.pt"), False),
    ("missing image folder", ["data=imagefolder", "data.root=nowhere"], None, False),
    ("missing checkpoint for resume", ["resume=runs/missing"], None, False),
    ("resume=latest with no runs", ["resume=latest"], None, False),
    ("mode=eval without resume", ["mode=eval"], None, False),
    ("corrupt checkpoint (one bit flipped)", [f"resume={CKPT}", "model=mlp"], flip_a_bit, True),
    ("truncated checkpoint", [f"resume={CKPT}", "model=mlp"], truncate, True),
    ("tampered state.pt.sha256", [f"resume={CKPT}", "model=mlp"], tamper_sha, True),
    ("missing state.pt.sha256", [f"resume={CKPT}", "model=mlp"], delete_sha, True),
    ("checkpoint whose pickle would run code", [f"resume={CKPT}", "model=mlp"], code_executing_pickle, True),
    ("resume with another model", ["resume=runs/ok", "model=cnn"], None, True),
    ("one class (data.num_classes=1)", ["data.num_classes=1"], None, False),
    ("one class in a tensors file", ["data=tensors", "data.root=one.pt", "model=mlp"],
     lambda d: labels_file(d, "one.pt", torch.zeros(64, dtype=torch.long)), False),
    ("a billion classes", ["data.num_classes=1000000000"], None, False),
    ("a label of 10**9 in a tensors file", ["data=tensors", "data.root=big.pt", "model=mlp"], big_label, False),
    ("a CNN on 1x1 inputs", ["data=synthetic", "data.input_shape=[1,1,1]", "model=cnn"], None, False),
    ("seed too large for torch", [f"seed={2**70}"], None, False),
    ("seed deleted", ["~seed"], None, False),
    ("a text file named .png in an image folder", ["data=imagefolder", "data.root=imgs", "data.image_size=8",
                                                    "data.num_workers=0", "model=mlp"],
     image_folder_with_a_text_png, False),
    ("zero-width hidden layer", ["model=mlp", "model.hidden_sizes=[0]"], None, False),
    ("zero input channels in a tensors file", ["data=tensors", "data.root=empty.pt", "model=mlp"],
     lambda d: labels_file(d, "empty.pt", torch.arange(64) % 3, shape=(0, 8, 8)), False),
    ("checkpoint.monitor that evaluation never logs", ["checkpoint.monitor=val/typo"], None, False),
    ("complex labels", ["data=tensors", "data.root=cplx.pt", "model=mlp"],
     lambda d: labels_file(d, "cplx.pt", (torch.arange(64) % 3).to(torch.complex64)), False),
    ("data.augment on synthetic data", ["data=synthetic", "data.augment=true"], None, False),
    ("augmentation policy without data.augment", ["data.policy=trivialaugment"], None, False),
    ("unknown augmentation policy", ["data.augment=true", "data.policy=autoaug"], None, False),
    ("repeated augmentation without augmentation", ["data.ra_reps=4"], None, False),
    ("resume=auto without run_name", ["resume=auto"], None, False),
    ("object store without its backend or with an unknown protocol", ["output_root=nosuch://bucket/runs"], None,
     False),
    ("sharded checkpoints in one process", ["checkpoint.format=sharded"], None, False),
    ("EMA on an interval with the decay warmup", ["regularization.ema_decay=0.99", "regularization.ema_every=4",
                                                  "regularization.ema_adjust=reference"], None, False),
    ("text data with a classification task", ["data=text"], None, False),
    ("a causal LM on image data", ["task=causal_lm", "model=gpt"], None, False),
    ("missing text corpus", ["task=causal_lm", "data=text", "model=gpt", "data.root=nowhere.txt"], None, False),
    ("text blocks of 0 tokens", ["task=causal_lm", "data=text", "model=gpt", "data.block_size=0"], None, False),
    ("mode=generate from a classifier run", ["mode=generate", "resume=runs/ok"], None, True),
    ("generation with a negative temperature", ["mode=generate", "resume=runs/ok", "temperature=-1"], None, True),
]


def one_line(p: subprocess.CompletedProcess) -> str:
    """The stderr line to show: the `trainrun: error:` line, else the last line; flags multi-line output."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    if not lines:
        return "(no stderr)"
    errors = [line for line in lines if line.startswith("trainrun: error:")]
    shown = errors[0] if errors else lines[-1]
    if len(lines) > 1:
        tb = " with a traceback" if any(line.startswith("Traceback") for line in lines) else ""
        shown += f"  [stderr had {len(lines)} lines{tb}]"
    return shown


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "bad_inputs.md"))
    opts = ap.parse_args()
    t0 = time.time()
    base = Path(tempfile.mkdtemp(prefix="trainrun-bad-inputs-"))
    rows, unclear = [], []
    try:
        trained = base / "trained"
        trained.mkdir()
        p = trainrun(trained, ["run_name=ok", "model=mlp", "trainer.max_steps=2", *FAST])
        if p.returncode != 0:
            sys.exit(f"could not train the reference run:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        for i, (what, args, setup, needs_run) in enumerate(CASES):
            cwd = base / f"case{i:02d}"
            if needs_run:
                shutil.copytree(trained, cwd)
            else:
                cwd.mkdir()
            if setup is not None:
                setup(cwd)
            p = trainrun(cwd, [*args, *FAST])
            msg = one_line(p).replace(str(cwd) + "/", "").replace(str(cwd), ".")
            if (cwd / "pwned").exists():
                msg += "  [THE PICKLE RAN CODE]"
            clean = not (cwd / "pwned").exists() and p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 \
                and p.stderr.startswith("trainrun: error:")
            if not clean:
                unclear.append(what)
            rows.append((what, "trainrun " + " ".join(shlex.quote(a) for a in args), p.returncode, msg))
            print(f"[{p.returncode}] {what}: {msg}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = [
        "# What trainrun says to bad input",
        "",
        "Generated by `python scripts/bad_inputs_table.py` (do not edit by hand): each row ran the real CLI",
        "(`python -m trainrun ARGS logger.progress=lines logger.plots=false`) in a fresh temporary directory and",
        "records its exit code and the stderr line it printed. Paths inside that temporary directory are shown",
        "relative to it. Checkpoint rows first train `runs/ok` (`model=mlp trainer.max_steps=2`), then damage it.",
        "",
        "| what is wrong | command | exit code | message (stderr line) |",
        "|---|---|---|---|",
        *(f"| {cell(w)} | `{cell(c)}` | {code} | {cell(m)} |" for w, c, code, m in rows),
        "",
        f"{len(rows) - len(unclear)} of {len(rows)} cases end with exit code 2 and exactly one "
        "`trainrun: error:` line on stderr" + (f"; not so: {', '.join(unclear)}." if unclear else "."),
        "",
    ]
    out.write_text("\n".join(text))
    print(f"wrote {out} ({len(rows)} cases, {time.time() - t0:.0f} s)")
    if unclear:
        print(f"cases without a single clear error line: {', '.join(unclear)}", file=sys.stderr)


if __name__ == "__main__":
    main()
