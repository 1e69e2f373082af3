"""checkpoint.async_save (issue 17 item 3) and retention milestones / the space line (item 5), in-process.

The end-to-end checks (an async run killed and relaunched ends SHA-equal to an uninterrupted synchronous run) are
in test_autoresume.py.
"""
import hashlib
import io
import threading

import pytest
import torch

from trainrun import checkpoint as ck
from trainrun.errors import CheckpointError


def _state(seed: int = 0):
    """A state with what a real one holds: a model and optimizer moments, a view into a shared storage, the same
    tensor twice, a Parameter, plain values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g)
    shared = torch.randn(10, generator=g)
    return {"model": {"w": w, "b": torch.zeros(4, dtype=torch.float64), "n": torch.tensor(3)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(6, 4, generator=g), "step": torch.tensor(5.0)}},
                          "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.999)}]},
            "views": {"head": shared[:4], "tail": shared[4:], "whole": shared, "again": w},
            "param": torch.nn.Parameter(torch.ones(3)),
            "trainer": {"step": 7, "name": "x", "history": [1.5, None, True]}}


def _bytes(state) -> bytes:
    buf = io.BytesIO()
    ck._save_uncrc(ck.canonical(state), buf)
    return buf.getvalue()


def test_snapshot_writes_the_same_bytes_and_is_a_copy():
    state = _state()
    snap = ck.snapshot(state)
    assert _bytes(snap) == _bytes(state)  # views, shared storages and the repeated tensor stay as they were
    assert snap["views"]["head"].untyped_storage().data_ptr() == snap["views"]["whole"].untyped_storage().data_ptr()
    before = _bytes(snap)
    with torch.no_grad():  # training goes on mutating the live tensors in place
        state["model"]["w"].add_(1.0)
        state["views"]["whole"].mul_(3.0)
        state["param"].add_(2.0)
    state["trainer"]["history"].append(9)
    assert _bytes(snap) == before and _bytes(snap) != _bytes(state)
    assert type(snap["param"]) is torch.nn.Parameter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_snapshot_of_gpu_tensors_keeps_their_location_in_the_file():
    state = {"w": torch.randn(5, 3, device="cuda"), "m": {"v": torch.arange(4, device="cuda")}}
    snap = ck.snapshot(state)
    assert snap["w"].device.type == "cpu"
    assert _bytes(snap) == _bytes(state)
    ck.release_snapshot(snap)
    assert not ck._SNAPSHOT_LOCATIONS


class _Gate:
    """Patch the state writer so that a write stops half-way (its temporary folder and state.pt exist, state.pt
    is still empty) until released: a deterministic window for what a crash mid-write leaves."""

    def __init__(self, monkeypatch):
        self.started, self.release = threading.Event(), threading.Event()
        real = ck._save_uncrc

        def save(obj, w):
            self.started.set()
            assert self.release.wait(30)
            real(obj, w)

        monkeypatch.setattr(ck, "_save_uncrc", save)


def _async_save(writer, run, step, state, **keep):
    snap = ck.snapshot(state)

    def write():
        path, sha = ck.write(run, step, snap, {"note": "t"})
        ck.publish(run, path, None, mode="max", keep_best=False, keep_last=keep.get("keep_last", 1),
                   keep_every_n_steps=keep.get("keep_every_n_steps", 0))
        return step, path, sha

    return writer.submit(write)


def test_a_write_in_flight_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first, sha1 = ck.save(run, 1, _state(1), {"note": "t"}, keep_last=1)
    state = _state(2)
    expected = _bytes(state)
    gate, writer = _Gate(monkeypatch), ck.AsyncWriter()
    _async_save(writer, run, 2, state)
    assert gate.started.wait(30)
    with torch.no_grad():
        state["model"]["w"].zero_()  # training mutates the state while the write is in flight
    # what a kill -9 now would leave: `latest` and every candidate a resume considers are the complete step 1
    assert ck.read_pointer(run, "latest") == first
    assert ck.candidates(str(run), tmp_path) == [first]
    assert ck.load(first)[1]["sha256"] == sha1
    tmp = list((run / "checkpoints").glob(".tmp-step_000000002-*"))
    assert len(tmp) == 1 and (tmp[0] / ck.STATE).stat().st_size == 0
    ck._retain(run, keep_last=1)  # retention never deletes the folder being written
    assert tmp[0].is_dir()
    previous = []  # submit returns the write it waited for
    second = threading.Thread(target=lambda: previous.append(_async_save(writer, run, 3, _state(3))))
    second.start()  # at most one write in flight: the next save waits for this one
    second.join(0.3)
    assert second.is_alive() and not list((run / "checkpoints").glob(".tmp-step_000000003-*"))
    gate.release.set()
    second.join(30)
    step, path, sha = writer.wait()
    assert step == 3 and ck.read_pointer(run, "latest") == path
    two = run / "checkpoints" / ck.step_name(2)
    assert not two.exists()  # keep_last=1: retention went on as usual once the writes completed
    # the bytes written are those of the state at the step boundary, as a synchronous save writes them
    sync = tmp_path / "sync"
    _, sync_sha = ck.save(sync, 2, _state(2), {"note": "t"}, keep_last=1)
    assert previous[0][0] == 2 and previous[0][2] == hashlib.sha256(expected).hexdigest() == sync_sha
    assert not ck._SNAPSHOT_LOCATIONS


def test_a_failed_background_write_is_raised_on_wait(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ck.save(run, 1, _state(1), {"note": "t"}, keep_last=2)
    writer = ck.AsyncWriter()

    def fail(obj, w):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ck, "_save_uncrc", fail)
    _async_save(writer, run, 2, _state(2))
    with pytest.raises(CheckpointError, match="could not write checkpoint .*step_000000002.*previous checkpoint is "
                                              "intact"):
        writer.wait()
    assert ck.read_pointer(run, "latest").name == ck.step_name(1)
    assert not writer.in_flight and writer.wait() is None


def test_retention_keeps_milestones_latest_and_best(tmp_path):
    run = tmp_path / "run"
    tiny = {"w": torch.ones(2)}
    for step in range(1, 11):
        ck.save(run, step, tiny, {"note": "t"}, keep_last=2, metric=1.0 if step == 3 else 0.0,
                keep_every_n_steps=4)
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.step_name(s) for s in (3, 4, 8, 9, 10)]
    ck.save(run, 11, tiny, {"note": "t"}, keep_last=2)  # without milestones: retention as before
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.step_name(s) for s in (3, 10, 11)]


def test_save_steps_and_the_space_line(tmp_path, monkeypatch):
    assert ck.save_steps(330, 50) == [50, 100, 150, 200, 250, 300, 330]
    assert ck.save_steps(330, 50, start=100) == [150, 200, 250, 300, 330]
    assert ck.save_steps(10, 3) == [3, 6, 9, 10]
    mib = 1 << 20
    steps = ck.save_steps(1000, 100)
    line, too_big = ck.space_plan(tmp_path / "runs/x", 45 * mib, steps, keep_last=2, keep_best=True,
                                  keep_every_n_steps=200)
    each = 45 * mib + (64 << 10)  # the state's bytes plus the pickle around them
    assert line.startswith(f"checkpoints: ~{each / mib:.1f} MiB each, at most 4 at once + 5 milestones = "
                           f"~{9 * each / mib:.0f} MiB in {tmp_path / 'runs/x'} (disk free: ")
    assert not too_big
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 100 * mib))
    line, too_big = ck.space_plan(tmp_path, 45 * mib, [5, 10], keep_last=2, keep_best=False, keep_every_n_steps=0)
    assert too_big is False and "at most 2 at once = ~90.1 MiB" in line and "disk free: 100 MiB" in line
    line, too_big = ck.space_plan(tmp_path, 45 * mib, steps, keep_last=2, keep_best=False, keep_every_n_steps=0)
    assert too_big is True and "at most 3 at once = ~135 MiB" in line


def test_the_end_of_a_run_waits_for_the_write_and_an_error_exit_only_warns(caplog):
    """Checkpointer.close: the final checkpoint, a signal stop and an error all wait for the write in flight; after
    an error a failed write is a warning (the error on its way out is the one reported)."""
    from trainrun.modes.session import Checkpointer

    saver = Checkpointer.__new__(Checkpointer)  # only the writer side: close() touches nothing else on failure
    saver.writer = ck.AsyncWriter()
    release = threading.Event()

    def failing_write():
        assert release.wait(30)
        raise CheckpointError("could not write checkpoint runs/x/checkpoints/step_000000004 (disk full)")

    saver.writer.submit(failing_write)
    release.set()
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        saver.close()  # a run that ends normally reports the failed write
    saver.writer.submit(failing_write)
    with caplog.at_level("WARNING", logger="trainrun"):
        saver.close(quiet=True)
    assert not saver.writer.in_flight
    assert "was not completed (could not write checkpoint" in caplog.text
