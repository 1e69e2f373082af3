"""The benchmark scripts (scripts/bench_*.py) run and write their JSON: structure only, never speed."""
import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def bench():
    """Import a script as a module; undo what its main() sets process-wide (torch threads, warning filters)."""
    import warnings

    import torch

    threads, filters = torch.get_num_threads(), list(warnings.filters)
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))
        torch.set_num_threads(threads)
        warnings.filters[:] = filters


def test_overhead_runs_the_same_trajectory(bench, tmp_path, capsys):
    out = tmp_path / "o.json"
    rec = bench("bench_overhead").main(["--quick", "--configs", "mlp_digits", "--precisions", "fp32", "--runners",
                                        "trainrun", "hand", "--steps-scale", "0.5", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "bench_overhead"
    res = rec["results"][0]
    assert res["steps_per_s"]["trainrun"]["median"] > 0 and res["steps_per_s"]["hand"]["median"] > 0
    assert "ratio_trainrun_over_hand" in res and "cpu_ratio_trainrun_over_hand" in res
    # the hand loop trains exactly what trainrun trains: same model, data order and optimizer
    (a,), (b,) = res["final_val_loss"]["trainrun"], res["final_val_loss"]["hand"]
    assert a == pytest.approx(b, rel=1e-6)
    assert "| trainrun/hand |" in capsys.readouterr().out.replace(" steps/s", "")


def test_overhead_counts_ops_and_calls_per_step(bench, tmp_path):
    """--count: per-step ATen ops and Python calls, deterministic where timings are not."""
    out = tmp_path / "n.json"
    rec = bench("bench_overhead").main(["--count", "--quick", "--configs", "mlp_digits", "--precisions", "fp32",
                                        "--out", str(out)])
    counts = rec["results"][0]["per_step"]
    assert json.loads(out.read_text())["results"][0]["per_step"] == counts
    hand, guard, off = counts["hand"], counts["trainrun (guard, step)"], counts["trainrun (no guard)"]
    assert hand["aten_ops"] > 50 and hand["python_calls"] > 100
    # the guard's fused inf/NaN check of the gradients and its two .item() reads, less the device loss accumulator
    # (the guard's host value is summed instead) on the steps between log steps
    assert guard["aten_ops"] - off["aten_ops"] >= 1 and guard["python_calls"] > off["python_calls"]
    assert counts["trainrun (guard, deferred)"]["aten_ops"] >= guard["aten_ops"]  # + the pre-update copy


def test_overhead_paired_chunks_compare_the_loops_in_one_process(bench, tmp_path, capsys):
    """--paired: trainrun's fit (with its real logger) and the hand loop alternate on one model in one process."""
    out = tmp_path / "p.json"
    rec = bench("bench_overhead").main(["--paired", "--quick", "--configs", "mlp_digits", "--precisions", "fp32",
                                        "--out", str(out)])
    res = rec["results"][0]
    assert json.loads(out.read_text())["results"][0]["config"] == "mlp_digits"
    for name in ("hand", "hand_check", "floor", "trainrun", "trainrun_noguard"):
        assert res["block_s_per_step"][name]["median"] > 0
        assert res[f"paired_ratio_{name}_over_hand"]["n"] == res["reps"]
    assert res["paired_ratio_hand_over_hand"]["median"] == 1.0
    assert "| mlp_digits | fp32 | trainrun |" in capsys.readouterr().out


def test_checkpoint_bench_structure(bench, tmp_path):
    out = tmp_path / "c.json"
    rec = bench("bench_checkpoint").main(["--quick", "--arch", "mobilenet_v3_small", "--reps", "1",
                                          "--dir", str(tmp_path), "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    assert {"trainrun", "torch.save", "torch.save+fsync"} <= set(res["seconds"])
    assert res["ratio_trainrun_over_torch.save"]["median"] > 0
    assert rec["results"]["bytes_written"]["trainrun"] > rec["results"]["bytes_written"]["torch.save"]  # + meta
    stall = json.loads(out.read_text())["stall"]  # sync vs checkpoint.async_save, the quick setting
    assert stall["checkpoints"] == 1 and stall["sync"]["blocked_per_checkpoint_s"]["median"] > 0
    assert "stall_per_checkpoint_s" in stall["async"]


def test_data_bench_structure(bench, tmp_path):
    out = tmp_path / "d.json"
    rec = bench("bench_data").main(["--quick", "--memory-sets", "digits", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "bench_data"
    loaders = {m["loader"] for m in rec["memory"]}
    assert "BatchStream (tensor-resident)" in loaders and "DataLoader w0" in loaders
    assert all(0 < m["load_share_of_step"] < 1 for m in rec["memory"])
    files = rec["files"]
    assert files["skipped_variants"] == []  # BatchStream takes persistent_workers / prefetch_factor
    assert all(files["identical_batches"].values())


def test_startup_importtime_parser(bench):
    mod = bench("bench_startup")
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        120 |   _io\n"
            "import time:        50 |        300 |     torch._C\n"
            "import time:      1000 |       1500 | torch\n")
    rows = mod.parse_importtime(text)
    assert [(r["module"], r["depth"], r["cum_us"]) for r in rows] == [("_io", 1, 120), ("torch._C", 2, 300),
                                                                      ("torch", 0, 1500)]
    compile(mod.PROBE, "probe", "exec")


def test_lm_bench_runs_both_loops_on_the_same_trajectory(bench, tmp_path, capsys):
    """bench_lm: trainrun's causal_lm loop and the nanoGPT-style hand loop train the same GPT on the same blocks."""
    out = tmp_path / "lm.json"
    rec = bench("bench_lm").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "bench_lm"
    assert {(r["config"], r["precision"]) for r in rec["results"]} == {
        (c, p) for c in ("gpt_tiny", "gpt_small") for p in ("fp32", "bf16")}
    for res in rec["results"]:
        assert res["tokens_per_s"]["trainrun"]["median"] > 0 and res["tokens_per_s"]["hand"]["median"] > 0
        assert res["tokens_per_step"] == res["batch_size"] * res["block_size"]
        assert "ratio_trainrun_over_hand" in res and "cpu_ratio_trainrun_over_hand" in res
        (a,), (b,) = res["final_val_loss"]["trainrun"], res["final_val_loss"]["hand"]
        assert a == pytest.approx(b, rel=1e-5) and a < 5.55  # below log(256): both trained, the same way
    assert "| trainrun/hand |" in capsys.readouterr().out.replace(" tokens/s", "")
