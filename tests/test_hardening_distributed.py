"""Issue 12 item 38: every parallel x precision pair on a model with BatchNorm, on 2 gloo ranks, and a failure
inside one rank's step ends in one line from rank 0."""
import pytest
import torch

from test_distributed import torchrun


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_parallel_and_precision_trains_the_batchnorm_cnn(tmp_path, parallel, precision):
    p = torchrun(tmp_path, "run_name=r", "model=cnn", f"trainer.parallel={parallel}", f"precision={precision}",
                 "trainer.max_steps=3", "trainer.eval_every=3", "data.batch_size=16")
    assert p.stdout.count("trainrun: finished") == 1
    st = torch.load(tmp_path / "runs/r/checkpoints/step_000000003/state.pt", weights_only=True)
    assert "1.running_mean" in st["model"] and st["model"]["1.running_var"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in st["model"].values() if v.is_floating_point())  # fp32 masters
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


INJECT = '''
import os
import trainrun.loop as loop

_step = loop.train_step


def train_step(t, batches, *args, **kwargs):
    if os.environ.get("RANK") == os.environ["FAIL_RANK"] and t.state.step == 2:
        raise RuntimeError("injected failure in the step\\nsecond line")
    return _step(t, batches, *args, **kwargs)


loop.train_step = train_step
'''


@pytest.mark.parametrize("fail_rank", ["0", "1"])
def test_a_failure_inside_a_rank_step_ends_in_one_line_from_rank_0(tmp_path, monkeypatch, fail_rank):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject/sitecustomize.py").write_text(INJECT)
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAIL_RANK", fail_rank)
    p = torchrun(tmp_path, "run_name=f", "model=mlp", "trainer.max_steps=6", "data.batch_size=16", check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("trainrun: error:")]
    assert len(errors) == 1, out[-3000:]
    assert f"rank {fail_rank}: RuntimeError: injected failure in the step" in errors[0]
    assert "second line" not in out and "Error executing job" not in out and "trainrun/loop.py" not in out
    assert "injected failure" in (tmp_path / f"runs/f/traceback_rank{fail_rank}.txt").read_text()
