"""Language models through the CLI: task=causal_lm on data=text with model=gpt — training metrics, exact resume
(SHA256-equal), activation checkpointing changing nothing but memory, and mode=generate's determinism."""
import json
import math
import re

import pytest

from conftest import FAST, read_jsonl, run_cli, sha_of

LM = ["task=causal_lm", "data=text", "model=gpt", "model.layers=2", "model.width=32", "model.heads=2",
      "data.block_size=32", "data.max_bytes=30000", "data.batch_size=8", "trainer.max_steps=8",
      "trainer.eval_every=4", "trainer.ckpt_every=4", "regularization.dropout=0.1", "seed=3", *FAST]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """One uninterrupted BPE run (8 steps), the same stopped at step 4 and resumed, and the same with activation
    checkpointing; the token cache is shared."""
    root = tmp_path_factory.mktemp("lm")
    common = [*LM, "data.tokenizer=bpe", "data.vocab_size=300", f"data.cache_dir={root / 'cache'}"]
    run_cli(root, *common, "run_name=full", "trainer.eval_at_start=true")  # an evaluation draws no randomness
    run_cli(root, *common, "run_name=part", "trainer.stop_at_step=4")
    run_cli(root, "resume=runs/part", "trainer.stop_at_step=null", *FAST)
    run_cli(root, *common, "run_name=ac", "trainer.activation_checkpointing=true")
    return root


def test_lm_logs_perplexity_and_tokens_per_second(lm):
    rows = read_jsonl(lm / "runs/full/metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "val/ppl" in r]
    assert train and evals
    assert all(r["train/ppl"] == pytest.approx(math.exp(r["train/loss"]), rel=1e-6) for r in train)
    assert all(r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 32, rel=1e-6) for r in train)
    assert all(r["val/ppl"] == pytest.approx(math.exp(r["val/loss"]), rel=1e-6) for r in evals)
    assert evals[0]["step"] == 0  # trainer.eval_at_start: GPT-2's init predicts close to uniformly
    vocab = json.loads((lm / "runs/full/checkpoints/step_000000008/meta.json").read_text())["io"]["vocab_size"]
    assert abs(evals[0]["val/loss"] - math.log(vocab)) < 0.05
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.1
    meta = json.loads((lm / "runs/full/checkpoints/step_000000008/meta.json").read_text())
    assert meta["io"]["task"] == "causal_lm" and meta["io"]["preprocess"]["tokenizer"]["kind"] == "bpe"
    assert meta["io"]["vocab_size"] <= 300


def test_lm_resume_is_bitwise_exact(lm):
    """(the uninterrupted run also evaluated at step 0: an evaluation changes nothing either)"""
    assert sha_of(lm / "runs/part", 8) == sha_of(lm / "runs/full", 8)


def test_activation_checkpointing_changes_nothing_but_memory(lm):
    assert sha_of(lm / "runs/ac", 8) == sha_of(lm / "runs/full", 8)


def _generate(root, *args):
    p = run_cli(root, "mode=generate", "resume=runs/full", *args)
    return p.stdout


def test_generate_is_deterministic_and_seeded(lm):
    a = _generate(lm, "prompt='def '", "max_new_tokens=24", "temperature=0.9", "top_k=20", "seed=1")
    b = _generate(lm, "prompt='def '", "max_new_tokens=24", "temperature=0.9", "top_k=20", "seed=1")
    c = _generate(lm, "prompt='def '", "max_new_tokens=24", "temperature=0.9", "top_k=20", "seed=2")
    assert a == b and a.startswith("def ")
    assert a != c
    samples = sorted((lm / "runs/full/generate").glob("*/generate.json"))
    record = json.loads(samples[-1].read_text())
    assert record["new_tokens"] == 24 and record["seed"] == 2 and record["top_k"] == 20
    assert (samples[-1].parent / "sample.txt").read_text() == c.rstrip("\n")


@pytest.mark.parametrize("args,message", [
    (["temperature=-1"], "temperature=-1.0: must be >= 0 and finite"),
    (["top_k=0"], "top_k=0: must be >= 1"),
    (["max_new_tokens=0"], "max_new_tokens=0: must be in [1, 100,000]"),
])
def test_generate_refuses_bad_settings_in_one_line(lm, args, message):
    p = run_cli(lm, "mode=generate", "resume=runs/full", *args, check=False)
    assert p.returncode == 2
    assert re.search(re.escape(message), p.stderr), p.stderr
    assert "Traceback" not in p.stderr


def test_generate_refuses_a_classifier(tmp_path):
    run_cli(tmp_path, "trainer.max_steps=2", "run_name=clf", *FAST)
    p = run_cli(tmp_path, "mode=generate", "resume=runs/clf", check=False)
    assert p.returncode == 2 and "needs a causal language model run (task=causal_lm)" in p.stderr
