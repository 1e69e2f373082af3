"""The Hydra entrypoint: compose configs/ + recipes/, hand the config to `runner.run`.

Also the small listing commands (`trainrun-recipes`) and the resolvers that pick the run directory:
a new run gets `output_root/<timestamp or run_name>`; a resume writes into the run it resumes.
"""
from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainrun.config import register_configs
from trainrun.errors import ConfigError, TrainrunError


def _asset_dir(name: str) -> Path:
    """configs/ or recipes/: inside the installed package (wheel) or at the repo top (editable/source)."""
    here = Path(__file__).resolve().parent
    for cand in (here / name, here.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"trainrun cannot find its {name}/ directory next to {here}")


CONFIGS_DIR = _asset_dir("configs")
RECIPES_DIR = _asset_dir("recipes")


def header_comment(path: Path) -> str:
    """A YAML file's leading comment block (without `@package`), one paragraph per item: an indented comment line
    continues the line above it, so the terminal can wrap the text itself."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or text.startswith("@package"):
            continue
        if lines and line[1:].startswith("  "):
            lines[-1] += " " + text
        else:
            lines.append(text)
    return "\n".join(lines)


def recipe_headers(recipes_dir: Path = RECIPES_DIR) -> Dict[str, str]:
    """name -> the recipe's leading comment block (what it reproduces, what it reached)."""
    return {path.stem: header_comment(path) for path in sorted(Path(recipes_dir).glob("*.yaml"))}


def register_recipes() -> None:
    """Each recipes/NAME.yaml becomes config `recipe/NAME` in package _global_, selected by +recipe=NAME."""
    cs = ConfigStore.instance()
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


_FIXED_NOW: Optional[str] = None  # under torchrun: rank 0's clock, so every rank picks the same run directory


def _now() -> str:
    return _FIXED_NOW or dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


_RUN_DIRS: Dict[tuple, str] = {}  # one answer per process: a new run's directory is created when first asked


def _run_dir(mode: str, resume: Optional[str], output_root: str, run_name: Optional[str]) -> str:
    """The run directory (Hydra's hydra.run.dir). Under torchrun rank 0 picks it and every rank gets its answer."""
    from trainrun import distributed

    key = tuple(None if v is None else str(v) for v in (mode, resume, output_root, run_name))
    if key not in _RUN_DIRS:
        picked = _pick_run_dir(*key) if distributed.env_info().is_main else None
        _RUN_DIRS[key] = distributed.broadcast_object(picked)
    return _RUN_DIRS[key]


def _pick_run_dir(mode: str, resume: Optional[str], output_root: str, run_name: Optional[str]) -> str:
    """A resume of a run directory (or of its newest checkpoint) continues in that directory, whatever its
    pointers say; naming an older checkpoint branches into a new directory; a new run without run_name gets a
    timestamped directory of its own (created here, exclusively)."""
    from trainrun import checkpoint, rundir, storage
    from trainrun.resume import WEIGHTS_MODES

    root = storage.local_root(output_root)  # a URL: its staging copy, uploaded at each checkpoint (trainrun.storage)
    if resume == "auto":  # the run if it has a checkpoint, else a fresh start (without run_name: refused already)
        from trainrun.resume import resolve_auto

        try:
            resume = resolve_auto(resume, root, run_name, mode)
        except TrainrunError:
            resume = None
    if resume:
        try:
            ckpt = checkpoint.candidates(str(resume), root, run_name)[0]
        except TrainrunError:
            ckpt = None  # runner.run reports the problem in one line before anything is written there
        if ckpt is not None:
            run = checkpoint.run_dir_of(ckpt)
            if mode in WEIGHTS_MODES:  # eval/test/predict/export write into RUN/MODE/<time>, never over the run
                return str(rundir.claim(run / mode, _now()))
            if checkpoint.is_latest(ckpt) and not storage.superseded(ckpt):
                return str(run)
            beside = run.parent if storage.remote_of(run) else root  # a bucket's run branches in the bucket
            return str(rundir.claim(beside, f"{run.name}-from-{ckpt.name}-{_now()}"))  # a branch: never overwrite
    if run_name:
        rundir.check_name("run_name", run_name)
        return str(root / run_name)
    return str(rundir.claim(root, _now()))


def _sweep_dir(sweep_name: Optional[str]) -> str:
    from trainrun import rundir

    rundir.check_name("sweep_name", sweep_name)
    return str(Path("multirun") / (sweep_name or _now()))


def _accumulation_for(global_batch, batch_size) -> int:
    """trainer.accumulation_steps that makes processes x data.batch_size x accumulation the recipe's global batch
    (recipes/resnet50_bf16.yaml); rounded, the LR then follows the batch in use (optimizer.scale_lr_with_batch)."""
    import os

    world = int(os.environ.get("WORLD_SIZE") or 1)
    return max(1, round(int(global_batch) / (world * int(batch_size))))


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("trainrun_accumulation"):
        OmegaConf.register_new_resolver("trainrun_accumulation", _accumulation_for)
    if not OmegaConf.has_resolver("trainrun_run_dir"):
        OmegaConf.register_new_resolver("trainrun_run_dir", _run_dir)
    if not OmegaConf.has_resolver("trainrun_sweep_dir"):  # cached: every job of a sweep shares one directory
        OmegaConf.register_new_resolver("trainrun_sweep_dir", _sweep_dir, use_cache=True)
    if not OmegaConf.has_resolver("trainrun_job_dir"):
        from trainrun.sweep import job_dir_name

        OmegaConf.register_new_resolver("trainrun_job_dir", job_dir_name)


def setup() -> None:
    register_configs()
    register_recipes()
    _register_resolvers()


_STARTED = time.time()  # when this process imported the CLI: a run directory newer than this is its own
_FAILED_JOBS = []  # multirun jobs that failed in this process (the sweep goes on; the exit code says so)
_SIGNAL_EXIT = []  # the exit code of a run stopped by a signal (128 + signum)
_RUN_DIR = []  # the run directory being written, for the one line a second Ctrl-C ends with


def _lock_run_dir(run_dir: Path) -> None:
    """One writer per run directory: the main rank holds its lock for the life of the process (a sweep's own
    directory is locked by rundir.SweepLock); a second writer ends here in one line, having written nothing."""
    from trainrun import distributed, rundir

    err = None
    if distributed.env_info().is_main:
        try:
            rundir.lock(run_dir, "run directory", "wait for it to finish (or stop it), then resume it; or pick "
                        "another run_name")
        except TrainrunError as e:
            err = str(e)
    err = distributed.broadcast_object(err)
    if err:
        _fail(err)


def _task(cfg: DictConfig):
    from hydra.types import RunMode

    from trainrun import rundir
    from trainrun.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    try:
        _lock_run_dir(run_dir)
    except OSError as e:  # the run directory cannot be created (a full disk): nothing of the run exists yet
        from trainrun.logging import write_failure

        _fail(str(write_failure(run_dir / rundir.LOCK_FILE, e, run_dir)))
    _RUN_DIR[:] = [run_dir]
    if hc.mode != RunMode.MULTIRUN:
        defaults = None
        if cfg.resume:
            from hydra import compose

            defaults = compose(config_name="config")  # what the config would be without this command's overrides
        try:
            final = run(cfg, run_dir, overrides, defaults)
        except TrainrunError as e:
            sys.stdout.flush()
            _drop_if_empty(run_dir)
            _fail(str(e), getattr(e, "exit_code", 2))
        except Exception as e:  # noqa: BLE001  (under torchrun: one line from rank 0, not a traceback per rank)
            rundir.accept_logs()
            from trainrun import distributed

            if not distributed.env_info().enabled:
                raise
            sys.stdout.flush()
            _fail(distributed.failure_line(e, run_dir), 1)
        except BaseException:
            rundir.accept_logs()  # a crash, not a refusal: its log belongs to the run
            raise
        rundir.accept_logs()  # the modes that end before the run's own accept (eval, lr_find, init_report)
        _upload_run_files(run_dir)
        _stopped_by_signal(final, run_dir)
        return final.get(f"best {cfg.checkpoint.monitor}", final.get(cfg.checkpoint.monitor))
    result = _sweep_job(cfg, run_dir, overrides, run)
    rundir.accept_logs()
    return result


def _sweep_job(cfg: DictConfig, run_dir: Path, overrides, run):
    """One job of a sweep: skip it if done, resume it if interrupted, record its result either way."""
    import time
    import traceback

    from trainrun import checkpoint, sweep

    done = sweep.read_result(run_dir)
    if done and done.get("status") == "completed" and done.get("overrides") == overrides:
        print(f"trainrun: sweep job {run_dir.name} already completed; skipped", flush=True)
        return done.get("best", (done.get("metrics") or {}).get(cfg.checkpoint.monitor))
    if cfg.resume == "auto":  # a job of a named sweep continues in its own folder (below), as without it
        cfg.resume = None
    if not cfg.resume and checkpoint.list_checkpoints(run_dir):
        cfg.resume = str(run_dir)  # an interrupted job of this sweep continues from its latest checkpoint
    if cfg.logger.group is None:
        cfg.logger.group = run_dir.parent.name  # wandb groups a sweep's runs under the sweep's name
    t0 = time.perf_counter()
    try:
        (run_dir / "job_label.txt").write_text(" ".join(overrides) + "\n")
        final = run(cfg, run_dir, overrides)
    except Exception as e:  # noqa: BLE001  (record any failure; the remaining jobs still run)
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, TrainrunError):
            line = f"{type(e).__name__}: {line}"
        try:
            if not isinstance(e, TrainrunError):
                (run_dir / "error.txt").write_text(traceback.format_exc())
            sweep.write_result(run_dir, status="failed", error=line, overrides=overrides,
                               wall_time_s=round(time.perf_counter() - t0, 2))
        except OSError:
            pass  # the disk is full: said below, and the next jobs would fail the same way
        if checkpoint._disk_full(e) or not (run_dir / sweep.RESULT_FILE).is_file():
            _fail(f"sweep job {run_dir.name} failed: {line}; the sweep stops here (re-running the same named sweep "
                  "skips the jobs that completed)")
        print(f"trainrun: error: sweep job {run_dir.name} failed: {line}", file=sys.stderr, flush=True)
        _FAILED_JOBS.append(run_dir.name)
        return None
    monitor = cfg.checkpoint.monitor
    metrics = {k: v for k, v in final.items() if k.startswith(("val", "val_raw"))}
    best = final.get(f"best {monitor}")
    try:
        sweep.write_result(run_dir, status="completed" if final.get("finished") else "interrupted", error=None,
                           overrides=overrides, metrics=metrics, best=best, step=final.get("step"), seed=cfg.seed,
                           wall_time_s=final.get("wall_time_s"))
    except OSError as e:  # a full disk after the job's last checkpoint
        from trainrun.logging import write_failure

        _fail(str(write_failure(run_dir / sweep.RESULT_FILE, e, run_dir)))
    code = signal_exit_code(final)
    if code:  # SIGTERM/SIGUSR1/Ctrl-C: end the sweep, resumable
        print(f"trainrun: sweep stopped by {signal.Signals(code - 128).name} during job {run_dir.name} (exit {code}); "
              "re-run the same command to continue", file=sys.stderr, flush=True)
        _hand_on_signal(final)
        sys.exit(code)
    return best if best is not None else metrics.get(monitor)


def _upload_run_files(run_dir: Path) -> None:
    """A run written to object storage: what it wrote after its last checkpoint (report, plots, logs)."""
    from trainrun import storage
    from trainrun.distributed import env_info

    if env_info().is_main:
        storage.sync_run(run_dir)


def _stopped_by_signal(final, run_dir: Path) -> None:
    from trainrun.distributed import env_info

    code = signal_exit_code(final)
    if code and env_info().rank == 0:
        print(f"trainrun: stopped by {signal.Signals(code - 128).name} at step {final.get('step')} after a complete "
              f"checkpoint (exit {code}); resume={run_dir} continues", file=sys.stderr, flush=True)
    if code:
        _SIGNAL_EXIT[:] = [code]
        _hand_on_signal(final)


def _hand_on_signal(final) -> None:
    """The checkpoint is complete: the handler the signal had before training took it over runs now. Under the
    submitit launcher that is submitit's own (SIGUSR2: it requeues the job with the same command, and exits)."""
    handler = final.get("handoff")
    if handler is not None:
        handler(final["signal"], None)


def _one_line(e: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one line that names the key and the fix."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from trainrun.config import TrainrunConfig

    chain, cur = [], e
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, MissingConfigException) and err.missing_cfg_file:
            group, _, name = err.missing_cfg_file.rpartition("/")
            options = ", ".join(err.options or [])
            return f"unknown option {group}={name}: choose one of {options}"
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and getattr(err, "full_key", None):
            parent = err.full_key.rpartition(".")[0]
            node = OmegaConf.select(OmegaConf.structured(TrainrunConfig), parent) if parent \
                else OmegaConf.structured(TrainrunConfig)
            valid = ", ".join(node.keys()) if node is not None else ""
            return f"unknown config key '{err.full_key}': valid keys{' in ' + parent if parent else ''} are {valid}"
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            msg = str(getattr(err, "msg", err)).splitlines()[0]
            return f"{err.full_key}: {msg}"
    return str(e).strip().splitlines()[0]


def _sweep_jobs(overrides) -> list:
    """The overrides of every job a `-m` sweep will launch, expanded as Hydra's basic sweeper does; an interval
    (optuna's search space) is represented by its two bounds."""
    import itertools

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    values = []
    for o in parser.parse_overrides(list(overrides)):
        key = o.get_key_element()
        if o.is_discrete_sweep():
            values.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        elif o.is_sweep_override():
            values.append([f"{key}={o.value().start}", f"{key}={o.value().end}"])
        else:
            values.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*values)]


def preflight(overrides, sweep: bool = False, search_path=()) -> None:
    """Compose and validate once before Hydra starts (every job of a `-m` sweep), so bad input fails in one line
    and creates no run or sweep directory. `search_path`: the user's config directories (user_search_path)."""
    from hydra import initialize_config_dir

    i, job = 0, list(overrides)
    jobs = [job]
    try:
        with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="trainrun"):
            jobs = _sweep_jobs(overrides) if sweep else jobs
            for i, job in enumerate(jobs):
                _preflight_job(job, check_dir=not sweep, search=searchpath_override(search_path))
        if sweep:
            jobs = [job]  # a problem with the sweep directory is no job's
            _check_writable(Path(_sweep_dir(None)), "the sweep directory multirun/", "run the sweep from a writable "
                            "directory")
    except Exception as e:  # noqa: BLE001  (Hydra raises several unrelated types for bad overrides)
        msg = str(e) if isinstance(e, TrainrunError) else _one_line(e)
        if sweep and len(jobs) > 1:  # name the job by its swept values
            swept = [o for k, o in enumerate(job) if len({j[k] for j in jobs}) > 1]
            msg = f"sweep job {i + 1} of {len(jobs)} ({' '.join(swept)}): {msg}"
        _fail(msg)


def _preflight_job(overrides, check_dir: bool, search=()) -> None:
    from hydra import compose

    from trainrun.config import validate
    from trainrun.resume import WEIGHTS_MODES, adopt_checkpoint_config, check_resume_compatible, resume_meta

    cfg = compose("config", overrides=[*overrides, *search])
    from trainrun import rundir

    raw = OmegaConf.to_container(cfg, resolve=False)  # names as typed: an interpolation is refused, not resolved
    rundir.check_name("run_name", raw.get("run_name"))
    rundir.check_name("sweep_name", raw.get("sweep_name"))
    rundir.check_name("run_name", cfg.run_name)  # resolved (an ${oc.env:VAR} name)
    rundir.check_name("sweep_name", cfg.sweep_name)
    validate(cfg)
    from trainrun.usercode import config_targets, import_targets

    import_targets(config_targets(cfg))  # this command's own targets (a resume's stored ones are not imported here)
    if cfg.distillation.name in ("response", "feature"):
        from trainrun import checkpoint

        checkpoint.candidates(cfg.distillation.teacher, cfg.output_root, key="distillation.teacher")
    target, what = _check_output_root(cfg, sweep=not check_dir), f"output_root={cfg.output_root}"
    if cfg.resume == "auto":
        cfg.resume = _preflight_auto(cfg, target, sweep=not check_dir)
    if cfg.resume and cfg.mode in ("train", *WEIGHTS_MODES):
        from trainrun import checkpoint

        ckpt = checkpoint.candidates(cfg.resume, cfg.output_root, cfg.run_name)[0]  # a URL: downloaded here
        target, what = checkpoint.run_dir_of(ckpt), f"resume={cfg.resume}"
    if cfg.resume and cfg.mode == "train":
        meta = resume_meta(cfg.resume, cfg)  # the newest checkpoint whose meta.json is sound, as a resume picks
        defaults = compose("config", overrides=list(search))
        cfg = adopt_checkpoint_config(cfg, defaults, list(overrides), meta["config"]["resolved"])
        check_resume_compatible(meta["config"]["resolved"], OmegaConf.to_container(cfg, resolve=True))
    if check_dir:
        _check_writable(target, what, "set output_root to a directory you can write" if not cfg.resume else
                        "copy the run to a writable disk and resume it there")


def _check_output_root(cfg: DictConfig, sweep: bool) -> Path:
    """The local directory new runs go under. For a URL (trainrun.storage): the backend, credentials and bucket
    are checked (read-only), and a named new run must not exist in the store already."""
    from trainrun import storage

    if not storage.is_url(cfg.output_root):
        return Path(cfg.output_root)
    if sweep:
        raise ConfigError(f"output_root={cfg.output_root}: a -m sweep writes its jobs under multirun/, not "
                          "output_root; run the jobs one by one with output_root=<url>, or sweep locally")
    storage.check_remote(cfg.output_root)
    if cfg.run_name and not cfg.resume:
        storage.check_new_run(f"{cfg.output_root.rstrip('/')}/{cfg.run_name}")
    return storage.local_root(cfg.output_root)


def _preflight_auto(cfg: DictConfig, root: Path, sweep: bool) -> Optional[str]:
    """resume=auto before Hydra starts: the run directory under `root` (where runs are written on this machine) to
    check as a resume, or None (a fresh start). A sweep's jobs continue in their own folders of a named sweep, so
    auto there needs sweep_name (an unnamed sweep gets a new timestamped folder at each launch)."""
    from trainrun import storage
    from trainrun.resume import resolve_auto

    if sweep and cfg.mode == "train":
        if not cfg.sweep_name:
            raise ConfigError("resume=auto in a sweep (-m, a launcher such as +cluster=slurm) continues each job in its "
                              "folder of a named sweep: add sweep_name=NAME, the same at every launch")
        return None
    if storage.is_url(cfg.output_root) and cfg.run_name:  # a clean machine continues the run the store holds
        storage.fetch_if_any(f"{cfg.output_root.rstrip('/')}/{cfg.run_name}")
    return resolve_auto(cfg.resume, root, cfg.run_name, cfg.mode)


def _check_writable(target: Path, what: str, fix: str) -> None:
    """Refuse (one line, before any compute) a run directory that cannot be created: an ancestor that is a file,
    a directory without write permission, or a read-only file system. Root passes permission checks, so a probe
    file is created (and removed) in the nearest existing ancestor as well."""
    import errno
    import os
    import tempfile

    where = target.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"{what}: {where} is a file, not a directory; {fix}")
    reason = None
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        reason = "a read-only file system"
    elif not os.access(where, os.W_OK | os.X_OK):
        reason = "no write permission"
    if reason is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".trainrun-probe-", dir=where)
            try:
                os.write(fd, bytes(4096))  # a full disk refuses even one block
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            reason = "a read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e)).lower()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                reason, fix = f"disk full: {reason}", f"free disk space or {fix}"
    if reason is not None:
        raise ConfigError(f"{what}: cannot write in {where} ({reason}); {fix}")


def _drop_if_empty(run_dir: Path) -> None:
    """A refusal found only once the run began (a data file, a checkpoint) leaves no empty run directory behind:
    Hydra created it for this command. One that was already there before it (older mtime) or holds anything stays."""
    try:
        if run_dir.stat().st_mtime >= _STARTED and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass  # not empty after all, or gone: nothing to tidy


def _fail(msg: str, code: int = 2) -> None:
    from trainrun.distributed import env_info

    # Config, checkpoint and data errors are the same on every rank: under torchrun rank 0 alone reports them.
    if env_info().rank == 0:
        print(f"trainrun: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def hydra_flags() -> set:
    """Every option string of Hydra's own command line (long and short), so the list cannot go stale."""
    from hydra._internal.utils import get_args_parser

    return {o for action in get_args_parser()._actions for o in action.option_strings}


RUN_FLAGS = {"-m", "--multirun", "-r", "--run"}  # Hydra flags that run jobs: their config is checked first


def split_args(args):
    """(the overrides to check before Hydra starts, the Hydra flags given): `hydra.*` overrides are Hydra's own."""
    known = hydra_flags()
    flags = [a for a in args if a.split("=")[0] in known]
    overrides = [a for a in args if a not in flags and not a.startswith(("hydra.", "hydra/"))]
    return overrides, flags


def flags_first(args):
    """The command line with Hydra's own options (and their values) ahead of the overrides, order kept within each:
    Hydra's argparse takes the overrides as one positional list, so `trainrun +recipe=x -m seed=0,1` would stop at
    `-m` with a usage error instead of sweeping."""
    from hydra._internal.utils import get_args_parser

    takes = {}  # option string -> 0 (a switch), 1 (one value) or "?" (an optional value)
    for action in get_args_parser()._actions:
        for option in action.option_strings:
            takes[option] = action.nargs if action.nargs in (0, "?") else 1
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        option, eq, _ = arg.partition("=")
        if option not in takes:
            overrides.append(arg)
        else:
            flags.append(arg)
            nxt = args[i + 1] if i + 1 < len(args) else None
            wants = takes[option] == 1 or (takes[option] == "?" and nxt is not None
                                            and not nxt.startswith(("-", "+", "~")) and "=" not in nxt)
            if not eq and wants and nxt is not None:
                flags.append(nxt)
                i += 1
        i += 1
    return flags + overrides


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def split_config_dir(args):
    """(the user's config directory or None, args without it): `--config-dir DIR`, `-cd DIR`, `--config-dir=DIR`
    or `-cd=DIR`; the last one given counts, as in Hydra's parser."""
    config_dir, rest, i = None, [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in CONFIG_DIR_FLAGS:
            if eq:
                config_dir = value
            elif i + 1 < len(args):
                config_dir, i = args[i + 1], i + 1
            else:
                raise ConfigError(f"{flag} needs a directory: {flag} DIR (its GROUP/OPTION.yaml files become "
                                  "GROUP=OPTION)")
        else:
            rest.append(args[i])
        i += 1
    return config_dir, rest


def _searchpath_entries(arg: str) -> list:
    """The entries of a `hydra.searchpath=[...]` override, as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except Exception as e:  # noqa: BLE001  (Hydra's grammar errors are several types)
        raise ConfigError(f"{arg}: {_one_line(e)}; write hydra.searchpath=[file://DIR,...]") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{arg}: hydra.searchpath takes a list of paths; write hydra.searchpath=[file://DIR,...]")
    return value


def user_search_path(config_dir: Optional[str], args) -> list:
    """The config search path this command adds to trainrun's configs/: the --config-dir directory (absolute,
    first, as Hydra adds it) then the entries of a `hydra.searchpath=[...]` override. A directory that does not
    exist is refused here (Hydra itself would stop with a traceback or only warn)."""
    entries = []
    if config_dir is not None:
        where = Path(config_dir).absolute()
        if not where.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: {where} is not a directory; give the directory that holds "
                              "your GROUP/OPTION.yaml files (e.g. myconfigs with myconfigs/model/unet.yaml)")
        entries.append(f"file://{where}")
    for arg in args:
        if arg.partition("=")[0].lstrip("+") == "hydra.searchpath":
            for entry in _searchpath_entries(arg):
                path = Path(entry[len("file://"):]) if entry.startswith("file://") else None
                if path is not None and not path.is_dir():
                    raise ConfigError(f"hydra.searchpath entry {entry}: {path.absolute()} is not a directory; give "
                                      "file://DIR of a directory that holds your GROUP/OPTION.yaml files")
                entries.append(entry)
    return entries


def check_not_shadowed(search_path, overrides) -> None:
    """Refuse `GROUP=NAME` when the user's directory and trainrun's own configs both have GROUP/NAME.yaml: Hydra
    searches trainrun's first, so the user's file would be silently ignored."""
    user_dirs = [Path(e[len("file://"):]) for e in search_path if e.startswith("file://")]
    if not user_dirs:
        return
    for arg in overrides:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or "." in key or key.startswith("~"):
            continue
        builtin_dir = RECIPES_DIR if key == "recipe" else CONFIGS_DIR / key
        for name in value.split(","):  # a sweep's choices
            ours = builtin_dir / f"{name}.yaml"
            theirs = next((d / key / f"{name}.yaml" for d in user_dirs if (d / key / f"{name}.yaml").is_file()), None)
            if theirs is not None and ours.is_file():
                raise ConfigError(f"{key}={name} names both trainrun's own {key} option and yours ({theirs}); "
                                  "trainrun's is found first and yours would be ignored: rename yours (e.g. "
                                  f"{key}/my_{name}.yaml) and select {key}=my_{name}")


def searchpath_override(entries) -> list:
    """[`hydra.searchpath=[...]`] for compose() to find the user's options, or [] when there are none."""
    if not entries:
        return []
    quoted = ["'" + e.replace("'", "\\'") + "'" for e in entries]
    return [f"hydra.searchpath=[{','.join(quoted)}]"]


def signal_exit_code(final) -> int:
    """A run stopped by a signal exits 128 + the signal's number (after its checkpoint is complete), so a scheduler
    does not see success; finishing, early stopping and trainer.stop_at_step exit 0."""
    signum = final.get("signal")
    return 128 + int(signum) if signum and not final.get("finished") else 0


def _interrupted() -> None:
    from trainrun import checkpoint

    run = _RUN_DIR[0] if _RUN_DIR else None
    where = ""
    if run is not None and checkpoint.list_checkpoints(run):
        where = f"; resume={run} continues from its latest complete checkpoint"
    elif run is not None:
        where = f"; {run} has no checkpoint yet"
    print(f"trainrun: interrupted by Ctrl-C{where}", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


def main() -> None:
    global _FIXED_NOW
    from trainrun import distributed

    setup()
    args = sys.argv[1:]
    info = distributed.init("cpu" if "trainer.device=cpu" in args else "auto")
    if info.enabled:
        _FIXED_NOW = distributed.broadcast_object(_now())
    try:
        config_dir, rest = split_config_dir(args)
        search_path = user_search_path(config_dir, rest)
        overrides, flags = split_args(rest)
        check_not_shadowed(search_path, overrides)
    except ConfigError as e:
        _fail(str(e))
    try:
        if not set(flags) - RUN_FLAGS:  # other flags print help/config or change the config source: Hydra's
            preflight(overrides, sweep=bool({"-m", "--multirun"} & set(flags)), search_path=search_path)
        sys.argv[1:] = flags_first(sys.argv[1:])
        hydra.main(config_path=str(CONFIGS_DIR), config_name="config", version_base="1.3")(_task)()
    except KeyboardInterrupt:  # outside training, or a second one: a checkpoint being written is dropped whole
        _interrupted()
    code = _SIGNAL_EXIT[0] if _SIGNAL_EXIT else 0
    if _FAILED_JOBS:
        print(f"trainrun: {len(_FAILED_JOBS)} sweep job(s) failed: {', '.join(_FAILED_JOBS)} "
              "(see summary.csv in the sweep directory)", file=sys.stderr, flush=True)
        code = code or 1
    if info.enabled:
        distributed.teardown(code)  # barrier, destroy the group, flush, os._exit: gloo ranks exit cleanly
    sys.exit(code)


def _listing_config_dir(prog: str, argv=None) -> Optional[str]:
    """The --config-dir of a listing command (trainrun-models, trainrun-recipes), checked in one line; it takes no
    other argument."""
    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(f"usage: {prog} [--config-dir DIR]   (DIR: your own configs, listed as yours)")
        sys.exit(0)
    try:
        config_dir, rest = split_config_dir(args)
        if rest:
            raise ConfigError(f"{prog} takes only --config-dir DIR, not {rest[0]!r}")
        user_search_path(config_dir, [])
    except ConfigError as e:
        _fail(str(e))
    return config_dir


def user_option_files(config_dir: Optional[str], group: str) -> Dict[str, Path]:
    """name -> file of the user's options of a group (DIR/GROUP/NAME.yaml, DIR as the user typed it)."""
    if config_dir is None:
        return {}
    return {p.stem: p for p in sorted((Path(config_dir) / group).glob("*.yaml"))}


def describe_user_option(path: Path, group: str, builtin) -> str:
    """A listing's description of a user option: whose it is and where, the code it names (its `_target_`s), a
    built-in model it configures, then its header comment. An option trainrun's own of the same name hides (Hydra
    searches configs/ first) says so."""
    from omegaconf import OmegaConf

    from trainrun.usercode import config_targets

    where = f"(yours: {path})"
    if path.stem in builtin:
        where = f"(yours: {path}; hidden by trainrun's own {group}={path.stem}: rename the file)"
    parts = [where]
    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # noqa: BLE001  (YAML and OmegaConf errors: shown in the row, the listing goes on)
        node = None
        parts.append(f"cannot be read: {_one_line(e)}")
    if isinstance(node, dict):
        targets = config_targets(node)
        parts += [f"{k + '.' if k else ''}_target_: {t}" for k, t in targets.items()]
        if group == "model" and not targets:
            from trainrun.models import MODELS

            parts.append(MODELS.describe().get(node.get("name"), ""))
    header = header_comment(path)  # a recipe's items stay paragraphs; an option's comment is one description
    parts.append(header if group == "recipe" else header.replace("\n", " "))
    return " ".join(p for p in parts if p)


def list_recipes_main() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    config_dir = _listing_config_dir("trainrun-recipes")
    table = Table(title="trainrun recipes (trainrun +recipe=NAME)", show_lines=True, expand=True)
    table.add_column("recipe", style="bold", no_wrap=True)
    table.add_column("what it reproduces / measured here", ratio=1)
    headers = recipe_headers()
    for name, header in headers.items():
        table.add_row(name, escape(header))
    for name, path in user_option_files(config_dir, "recipe").items():
        table.add_row(name, escape(describe_user_option(path, "recipe", headers)))
    Console().print(table)


def list_models_main() -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    from trainrun.models import model_options, zoo

    zoo_args = sys.argv[1:]
    if zoo_args and zoo_args[0] in zoo.ZOOS:  # `trainrun-models torchvision|timm`: the zoo's architecture names
        if len(zoo_args) > 1:
            _fail(f"trainrun-models {zoo_args[0]} takes no other argument, not {zoo_args[1]!r}")
        try:
            print("\n".join(zoo.zoo_names(zoo_args[0])))
        except ImportError:
            _fail(f"trainrun-models timm: timm is not installed; {zoo.TIMM_EXTRA}")
        return
    config_dir = _listing_config_dir("trainrun-models")
    table = Table(title="trainrun models (trainrun model=NAME)")
    table.add_column("model", style="bold")
    table.add_column("what it is")
    options = model_options(CONFIGS_DIR / "model")
    for name, doc in options.items():
        table.add_row(name, escape(doc))
    for name, path in user_option_files(config_dir, "model").items():
        table.add_row(name, escape(describe_user_option(path, "model", options)))
    Console().print(table)
    Console().print(escape(zoo.listing_hint()))
