"""Every LR schedule against its reference implementation, step by step, plus end-to-end CLI runs.

Convention: `Schedule.multiplier(t)` is the factor on the base LR used by optimizer step t. For a torch
scheduler that is the LR in the optimizer after t `scheduler.step()` calls (OneCycleLR sets the step-0
value at construction).
"""
import os

os.environ["WANDB_MODE"] = "disabled"

import json  # noqa: E402
import math  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

transformers_opt = pytest.importorskip("transformers.optimization")

from trainrun.config import ScheduleConfig  # noqa: E402
from trainrun.errors import ConfigError  # noqa: E402
from trainrun.schedule import Schedule  # noqa: E402
from conftest import trainrun_process  # noqa: E402

WT = [(0, 50), (10, 100), (7, 33), (3, 4)]  # (warmup, total) pairs


def sched(name, T, monitor_mode="max", **kw):
    cfg = OmegaConf.structured(ScheduleConfig)
    cfg.name = name
    for k, v in kw.items():
        cfg[k] = v
    return Schedule(cfg, T, steps_per_epoch=10, monitor_mode=monitor_mode)


def optimizer(lr):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    opt.param_groups[0]["base_lr"] = lr  # what trainrun.optim records for Schedule.apply
    return opt


def reference_lrs(make, base, n, steps=None):
    """LR before optimizer step t, t in range(n), of scheduler `make(opt)` (stepped at most `steps` times)."""
    opt = optimizer(base)
    ref = make(opt)
    out = []
    for t in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if steps is None or t < steps:
            ref.step()
    return out


def assert_matches(s, ref, base, exact=False):
    for t, lr in enumerate(ref):
        got = base * s.multiplier(t)
        if exact:
            assert got == lr, (t, got, lr)
        else:
            assert got == pytest.approx(lr, rel=1e-12, abs=1e-15), (t, got, lr)


# ------------------------------------------------------------------------------------------------------------
# transformers references (LambdaLR)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("W,T", WT)
@pytest.mark.parametrize("r", [0.0, 0.1])
@pytest.mark.parametrize("base", [1.0, 0.3])
def test_warmup_cosine_matches_transformers(W, T, r, base):
    if r:
        make = lambda o: transformers_opt.get_cosine_with_min_lr_schedule_with_warmup(o, W, T, min_lr_rate=r)  # noqa
    else:
        make = lambda o: transformers_opt.get_cosine_schedule_with_warmup(o, W, T)  # noqa
    s = sched("warmup_cosine", T, warmup_steps=W, min_lr_ratio=r)
    ref = reference_lrs(make, base, T + 5)
    assert_matches(s, ref[: T + 1], base, exact=base == 1.0)
    # past the end transformers' cosine rises again (cos beyond pi); trainrun holds the end value
    for t in range(T + 1, T + 5):
        assert s.multiplier(t) == s.multiplier(T)
    if T - W > 1:
        assert ref[T + 4] > ref[T]  # (the reference really does differ there)


@pytest.mark.parametrize("W,T", WT)
@pytest.mark.parametrize("base", [1.0, 0.3])
def test_warmup_linear_matches_transformers(W, T, base):
    s = sched("warmup_linear", T, warmup_steps=W)
    ref = reference_lrs(lambda o: transformers_opt.get_linear_schedule_with_warmup(o, W, T), base, T + 5)
    assert_matches(s, ref, base, exact=base == 1.0)


@pytest.mark.parametrize("W,T", WT)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("r,base", [(0.0, 1.0), (0.0, 0.3), (0.05, 1.0), (0.05, 3e-4)])
def test_polynomial_matches_transformers(W, T, power, r, base):
    s = sched("polynomial", T, warmup_steps=W, power=power, min_lr_ratio=r)
    make = lambda o: transformers_opt.get_polynomial_decay_schedule_with_warmup(  # noqa: E731
        o, W, T, lr_end=base * r, power=power)
    ref = reference_lrs(make, base, T + 5)
    assert_matches(s, ref, base, exact=base == 1.0)
    assert s.multiplier(T) == pytest.approx(r)


def test_polynomial_power_1_equals_warmup_linear():
    p = sched("polynomial", 100, warmup_steps=10, power=1.0, min_lr_ratio=0.1)
    lin = sched("warmup_linear", 100, warmup_steps=10, min_lr_ratio=0.1)
    for t in range(105):
        assert p.multiplier(t) == pytest.approx(lin.multiplier(t), abs=1e-12)


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("W,T,decay_fraction,r", [
    (0, 50, 0.2, 0.0), (10, 100, 0.1, 0.0), (7, 33, 0.3, 0.1), (5, 25, 0.1, 0.0),  # 2.5 -> 2 decay steps
    (10, 20, 0.6, 0.05),  # warmup + decay longer than the run: negative stable phase, as transformers computes it
    (0, 10, 1.0, 0.0), (4, 40, 0.0, 0.0)])
@pytest.mark.parametrize("base", [1.0, 0.3])
def test_wsd_matches_transformers(decay_type, W, T, decay_fraction, r, base):
    D = round(decay_fraction * T)
    s = sched("wsd", T, warmup_steps=W, decay_fraction=decay_fraction, decay_type=decay_type, min_lr_ratio=r)
    assert s.decay_steps == D
    make = lambda o: transformers_opt.get_wsd_schedule(  # noqa: E731
        o, num_warmup_steps=W, num_decay_steps=D, num_training_steps=T, min_lr_ratio=r, decay_type=decay_type)
    ref = reference_lrs(make, base, T + 5)
    assert_matches(s, ref, base, exact=base == 1.0)


def test_wsd_shape():
    s = sched("wsd", 100, warmup_steps=10, decay_fraction=0.2, decay_type="linear", min_lr_ratio=0.1)
    assert s.multiplier(0) == pytest.approx(0.1)  # WSD warms up from min_lr_ratio (transformers)
    assert [s.multiplier(t) for t in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert s.multiplier(90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.multiplier(100) == s.multiplier(1000) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------------------
# torch references
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step_size,gamma,T", [(7, 0.1, 60), (10, 0.5, 33), (1, 0.9, 20)])
def test_step_matches_torch(step_size, gamma, T):
    s = sched("step", T, step_size=step_size, gamma=gamma)
    make = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma)  # noqa: E731
    assert_matches(s, reference_lrs(make, 0.3, T + 5), 0.3)


@pytest.mark.parametrize("fractions,T", [([0.3, 0.6, 0.9], 100), ([0.25, 0.5], 37), ([0.5], 11)])
def test_multistep_matches_torch(fractions, T):
    s = sched("multistep", T, milestones=fractions, gamma=0.1)
    make = lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=s.milestones, gamma=0.1)  # noqa: E731
    assert_matches(s, reference_lrs(make, 0.2, T + 5), 0.2)


@pytest.mark.parametrize("gamma,T", [(0.9, 50), (0.99, 200), (0.5, 10), (1.0, 5)])
def test_exponential_matches_torch(gamma, T):
    s = sched("exponential", T, gamma=gamma)
    make = lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=gamma)  # noqa: E731
    for base in (1.0, 0.05):
        assert_matches(s, reference_lrs(make, base, T + 5), base)  # torch multiplies recursively: not bitwise


def test_exponential_with_warmup():
    s = sched("exponential", 100, warmup_steps=4, gamma=0.9)
    assert [s.multiplier(t) for t in range(4)] == [0.0, 0.25, 0.5, 0.75]
    for t in range(4, 105):
        assert s.multiplier(t) == pytest.approx(0.9 ** t)  # gamma ** t, as the step schedules count t


@pytest.mark.parametrize("T,pct_start,div,final_div", [
    (100, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0), (10, 0.5, 25.0, 1e4), (7, 0.1, 5.0, 10.0),
    (1, 0.3, 25.0, 1e4), (50, 0.0, 25.0, 1e4), (20, 0.95, 25.0, 1e4), (1000, 0.3, 25.0, 1e4)])
@pytest.mark.parametrize("base", [1.0, 0.01])
def test_onecycle_matches_torch(T, pct_start, div, final_div, base):
    s = sched("onecycle", T, pct_start=pct_start, div_factor=div, final_div_factor=final_div)
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        o, max_lr=base, total_steps=T, pct_start=pct_start, div_factor=div, final_div_factor=final_div,
        anneal_strategy="cos", three_phase=False, cycle_momentum=False)
    ref = reference_lrs(make, base, T + 1, steps=T)  # OneCycleLR refuses to step past total_steps
    assert_matches(s, ref, base, exact=base == 1.0)
    for t in range(T + 1, T + 5):
        assert s.multiplier(t) == s.multiplier(T)
    if pct_start * T >= 2:  # (a shorter rising phase starts where torch's arithmetic puts it, near max_lr)
        assert s.multiplier(0) == pytest.approx(1 / div)
    if T > 1:
        assert s.multiplier(T - 1) == pytest.approx(1 / div / final_div)
        assert max(s.multiplier(t) for t in range(T)) <= 1.0


@pytest.mark.parametrize("key,value", [("warmup_steps", 5), ("warmup_fraction", 0.1), ("warmup_epochs", 1.0)])
def test_onecycle_with_warmup_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"schedule\.{key}.*onecycle.*schedule\.{key}=0"):
        sched("onecycle", 100, **{key: value})
    sched("onecycle", 100)  # without a warmup it builds
    sched("warmup_cosine", 100, **{key: value})  # and the warmup still works for the others


# ------------------------------------------------------------------------------------------------------------
# plateau vs ReduceLROnPlateau
# ------------------------------------------------------------------------------------------------------------

NAN = float("nan")
SEQUENCES = {
    # accuracy-like, max mode: improvements, sub-threshold "improvements", a NaN, a missing value (None)
    "max": [0.5, 0.6, 0.6, 0.60003, 0.6, 0.61, NAN, 0.61, 0.605, 0.62, 0.62, None, 0.62, 0.7, 0.7, 0.69, 0.7,
            0.7, 0.7, 0.7, 0.71, 0.71, 0.71, 0.71, 0.71, 0.71, 0.71, 0.71, 0.71, 0.71],
    # loss-like, min mode
    "min": [2.3, 1.9, 1.5, 1.5, 1.49995, 1.6, 1.4, NAN, 1.4, 1.4, 1.41, 1.2, 1.2, 1.2, 1.2, 1.2, 1.1, NAN, NAN,
            NAN, 1.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}
PLATEAU_CASES = [  # (mode, factor, patience, cooldown, min_lr_ratio, threshold)
    ("max", 0.5, 2, 0, 0.0, 1e-4), ("max", 0.5, 0, 2, 0.1, 1e-4), ("max", 0.1, 1, 1, 0.0, 0.0),
    ("min", 0.5, 3, 0, 0.0, 1e-4), ("min", 0.5, 0, 1, 0.2, 1e-4), ("min", 0.3, 1, 3, 0.01, 0.05),
]


def plateau_pair(mode, factor, patience, cooldown, r, threshold, base):
    s = sched("plateau", 1000, monitor_mode=mode, factor=factor, patience=patience, cooldown=cooldown,
              min_lr_ratio=r, threshold=threshold)
    opt = optimizer(base)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=factor, patience=patience,
                                                     threshold=threshold, threshold_mode="rel", cooldown=cooldown,
                                                     min_lr=base * r)
    return s, opt, ref


@pytest.mark.parametrize("case", PLATEAU_CASES)
@pytest.mark.parametrize("base", [1.0, 0.1])
def test_plateau_matches_torch(case, base):
    mode = case[0]
    s, opt, ref = plateau_pair(*case, base)
    reductions = 0
    for i, v in enumerate(SEQUENCES[mode]):
        before = s.multiplier(50)
        s.on_eval(v)
        ref.step(NAN if v is None else v)
        reductions += s.multiplier(50) < before
        assert base * s.multiplier(50) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (i, v)
        assert (s.num_bad_evals, s.cooldown_counter) == (ref.num_bad_epochs, ref.cooldown_counter), i
        assert s.best == ref.best or (math.isinf(s.best) and s.best == ref.best), i
    assert reductions >= 2  # the sequences really exercise the reductions
    if case[4] and case[1] == 0.5 and case[2] == 0:
        assert s.multiplier(50) == pytest.approx(case[4])  # reached the floor and stayed there


def test_plateau_nan_and_none_are_no_improvement():
    s = sched("plateau", 100, monitor_mode="min", factor=0.5, patience=1)
    s.on_eval(1.0)
    s.on_eval(NAN)
    assert (s.best, s.num_bad_evals, s.scale) == (1.0, 1, 1.0)
    s.on_eval(None)
    assert (s.best, s.num_bad_evals, s.scale) == (1.0, 0, 0.5)
    s.on_eval(torch.tensor(0.5))  # a 0-dim tensor works like a float
    assert s.best == 0.5


def test_plateau_multiplier_is_warmup_times_factor_and_reduction_applies_at_once():
    s = sched("plateau", 100, warmup_steps=4, factor=0.5, patience=0)
    assert [s.multiplier(t) for t in (0, 2, 4, 50)] == [0.0, 0.5, 1.0, 1.0]
    opt = optimizer(0.2)
    s.apply(opt, 2)
    s.on_eval(0.3)  # first value: an improvement over -inf
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    s.on_eval(0.3)  # no improvement, patience 0 -> halve, and the optimizer's LR follows before the next step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert [s.multiplier(t) for t in (0, 2, 4, 50)] == [0.0, 0.25, 0.5, 0.5]
    # step-driven schedules ignore evaluations
    c = sched("warmup_cosine", 100, warmup_steps=4)
    c.on_eval(0.1)
    c.on_eval(NAN)
    assert c.multiplier(4) == 1.0


def _plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    return x is None or type(x) in (int, float, str, bool)


@pytest.mark.parametrize("case", PLATEAU_CASES)
def test_plateau_state_survives_checkpoint_roundtrip(case, tmp_path):
    mode = case[0]
    seq = SEQUENCES[mode]
    straight, _, _ = plateau_pair(*case, 1.0)
    trajectory = []
    for v in seq:
        straight.on_eval(v)
        trajectory.append((straight.multiplier(50), straight.state_dict()))
    for k in range(len(seq) + 1):  # split anywhere: before any eval, mid-patience, in a cooldown, after a NaN
        a, _, _ = plateau_pair(*case, 1.0)
        for v in seq[:k]:
            a.on_eval(v)
        sd = a.state_dict()
        assert _plain(sd), sd
        torch.save(sd, tmp_path / "s.pt")
        b, _, _ = plateau_pair(*case, 1.0)
        b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        assert b.state_dict() == sd
        for i, v in enumerate(seq[k:], start=k):
            b.on_eval(v)
            assert (b.multiplier(50), b.state_dict()) == trajectory[i], (k, i)


def test_state_dicts_are_small_plain_and_deterministic():
    for name in ("constant", "warmup_cosine", "warmup_linear", "exponential", "wsd", "polynomial", "onecycle"):
        s = sched(name, 100, **({"warmup_steps": 5} if name != "onecycle" else {}))
        assert s.state_dict() == {"name": name, "total": 100, "warmup": 0 if name == "onecycle" else 5}
    p = sched("plateau", 100, monitor_mode="min")
    assert p.state_dict() == {"name": "plateau", "total": 100, "warmup": 0, "mode": "min", "best": math.inf,
                              "num_bad_evals": 0, "cooldown_counter": 0, "scale": 1.0}
    # a checkpoint from another schedule (or an older trainrun) leaves the plateau state fresh
    p.load_state_dict({"name": "warmup_cosine", "total": 100, "warmup": 0})
    assert p.state_dict()["best"] == math.inf


# ------------------------------------------------------------------------------------------------------------
# end to end: the CLI composes each option and trains; logged LRs follow the schedule
# ------------------------------------------------------------------------------------------------------------

ENV = {**os.environ, "WANDB_MODE": "disabled"}
CLI_RUNS = {  # schedule -> extra overrides that make its 6 steps interesting
    "exponential": ["schedule.gamma=0.8"], "wsd": ["schedule.decay_fraction=0.5"], "polynomial": [],
    "onecycle": []}  # plateau: its run is run `a` of the resume test (20 steps, a few reductions)
RESUME = ["schedule=plateau", "schedule.patience=0", "trainer.eval_every=2", "trainer.max_steps=20", "model=mlp",
          "logger.progress=off", "logger.log_every=1"]


def cli(cwd, *args):
    p = trainrun_process(args, cwd, ENV, timeout=300)
    assert p.returncode == 0, \
        f"trainrun {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The end-to-end runs of this file, two at a time in the background (each is mostly interpreter start-up and
    imports); a test waits for its own with `.result()`. Maps a key to (cwd, future of the stdout)."""
    pool = ThreadPoolExecutor(max_workers=2)
    d = tmp_path_factory.mktemp("resume")
    jobs = {"resume_a": (d, pool.submit(cli, d, *RESUME, "run_name=a")),
            "resume_b": (d, pool.submit(cli, d, *RESUME, "run_name=b", "trainer.stop_at_step=9"))}
    for name, extra in CLI_RUNS.items():
        cwd = tmp_path_factory.mktemp(name)
        jobs[name] = (cwd, pool.submit(cli, cwd, f"schedule={name}", "trainer.max_steps=6", "trainer.eval_every=2",
                                       "model=mlp", "logger.progress=off", "logger.log_every=1", *extra))
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", [*CLI_RUNS, "plateau"])
def test_cli_schedule_composes_trains_and_logs_its_lr(name, launched):
    cwd, job = launched[name if name in CLI_RUNS else "resume_a"]
    job.result()
    run_dir = cwd / "runs" / "a" if name == "plateau" else next((cwd / "runs").glob("*"))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.schedule.name == name
    T = cfg.trainer.max_steps
    s = Schedule(cfg.schedule, T, 22, monitor_mode=cfg.checkpoint.monitor_mode)
    base = cfg.optimizer.lr
    logged = []
    for r in rows(run_dir):
        if "lr" in r:  # the LR after step t is the one optimizer step t + 1 uses: base * multiplier(t)
            assert r["lr"] == pytest.approx(base * s.multiplier(r["step"]), rel=1e-12, abs=1e-18), r
            logged.append(r["step"])
        elif cfg.checkpoint.monitor in r:
            s.on_eval(r[cfg.checkpoint.monitor])  # replay the evaluations (plateau)
    assert logged == list(range(1, T + 1))
    assert len({r["lr"] for r in rows(run_dir) if "lr" in r}) > 1  # the LR really moved


def test_cli_plateau_resume_is_bitwise_equal(launched):
    launched["resume_a"][1].result()
    d, job = launched["resume_b"]
    assert "stopped at step 9/20" in job.result()
    # a second stop right after an evaluation (step 14): a reduction there must already be in the checkpoint
    out = cli(d, "resume=runs/b", *RESUME, "run_name=b", "trainer.stop_at_step=14")
    assert "at step 9" in out and "stopped at step 14/20" in out
    out = cli(d, "resume=runs/b", *RESUME, "run_name=b")
    assert "at step 14" in out
    runs = d / "runs"
    sha = lambda run: (runs / run / "checkpoints/step_000000020/state.pt.sha256").read_text().split()[0]  # noqa
    assert sha("a") == sha("b")
    state = torch.load(runs / "a/checkpoints/step_000000020/state.pt", weights_only=True)["schedule"]
    assert state["name"] == "plateau" and state["scale"] < 1.0  # the plateau really reduced the LR
    lrs = lambda run: [(r["step"], r["lr"]) for r in rows(runs / run) if "lr" in r]  # noqa: E731
    assert lrs("a") == lrs("b")
    assert len({lr for _, lr in lrs("a")}) > 2
