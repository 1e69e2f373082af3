"""Run directories: what a run or sweep name may be, unique creation, the writer's lock, and the run's log file.

- A name (`run_name`, `sweep_name`) is one folder under its root: no separators, `..` or `${...}` interpolations.
- A run without `run_name` claims `output_root/<timestamp>` with an exclusive mkdir (`-1`, `-2`, ... on collision),
  so two runs started in the same second never share a directory.
- One process writes a run directory (or a sweep directory) at a time: it holds `fcntl.flock` on the directory
  itself (taking it writes nothing); its PID and host go into `.trainrun.lock` once the run is accepted. The kernel
  drops the lock when the holder dies, even by kill -9.
- Hydra's job log (`trainrun.log`) is opened only once the run is accepted (`accept`), so a refused command
  (say a resume that does not fit) appends nothing to an existing run's log.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import re
import shutil
import socket
import weakref
from pathlib import Path
from typing import Dict, List, Optional

from hydra.experimental.callback import Callback

from trainrun.errors import ConfigError

LOCK_FILE = ".trainrun.lock"
CONFIG_FILE = "config.yaml"
# What a run writes before its first checkpoint; a new run in a directory with no checkpoint removes these.
STALE_FILES = ("config.yaml", "metrics.jsonl", "metrics.discarded.jsonl", "stats.jsonl", "badsteps.jsonl",
               "trainrun.log", "overfit_batch.json", "init_report.json", "lr_find.json", "lr_find.png")
STALE_DIRS = ("plots",)


# A name may read an environment variable (run_name=${oc.env:SLURM_JOB_ID}: stable across a SLURM requeue); the
# resolved name is checked again (cli._pick_run_dir, cli._preflight_job).
_ENV_ONLY = re.compile(r"(?:\$\{oc\.env:[A-Za-z_][A-Za-z0-9_]*\}|[^$])+")


def check_name(key: str, value) -> None:
    """Refuse a run/sweep name that is not one plain folder name (it would leave its root or be resolved)."""
    if value is None:
        return
    text = str(value)
    why = None
    if "${" in text and not _ENV_ONLY.fullmatch(text):
        why = "it is an interpolation other than ${oc.env:VAR}"
    elif not text.strip():
        why = "it is empty"
    elif any(sep in text for sep in ("/", "\\", os.sep, os.altsep or "/", "\0")):
        why = "it contains a path separator"
    elif text in (".", ".."):
        why = f"'{text}' is not a folder name"
    elif text == LOCK_FILE:
        why = "the name is reserved"
    if why:
        root, where = ("multirun/", "") if key == "sweep_name" else \
            ("output_root", " (set output_root to choose where runs go)")
        raise ConfigError(f"{key}={text!r} must be one folder name under {root} ({why}); use a plain name such as "
                          f"{key}=exp1{where}")


def claim(root: Path, name: str) -> Path:
    """Create root/name exclusively, or root/name-1, root/name-2, ... if taken; returns the directory made.

    If the root cannot be created at all, the plain path is returned unclaimed (the run reports the problem)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return root / name
    for i in range(10_000):
        cand = root / (name if i == 0 else f"{name}-{i}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
        except OSError:
            return cand
    raise ConfigError(f"output_root={root}: 10000 runs named {name}* already exist; set run_name")


_HELD: Dict[str, int] = {}  # resolved directory -> fd of its lock file, open (and locked) for the process's life


def _holder(directory: Path) -> str:
    try:
        info = json.loads((Path(directory) / LOCK_FILE).read_text() or "{}")
        return f"PID {info['pid']} on host {info['host']} (since {info.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "a process that has not yet recorded its PID"


def lock(directory: Path, what: str, fix: str) -> None:
    """Hold an exclusive lock on `directory` until this process exits; ConfigError if another process holds it.

    The lock is an flock on the directory itself, so taking it writes nothing: a command refused after this point
    leaves an existing run byte-identical. The holder's PID and host go into LOCK_FILE only once its run is accepted
    (`record_holder`). `what` names the directory in the message ("run directory"), `fix` says what to do instead."""
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _HELD:
        return
    import fcntl

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot open {directory} to lock it ({e.strerror or e}); make it a writable directory or "
                          "set output_root to a writable directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this file system
            logging.getLogger("trainrun").warning("no lock on %s (%s): nothing stops a second writer", directory, e)
            _HELD[key] = fd
            return
        os.close(fd)
        raise ConfigError(f"{what} {directory} is in use by another trainrun process: {_holder(directory)}; "
                          f"{fix}") from None
    _HELD[key] = fd


def record_holder(directory: Path) -> None:
    """Write this process's PID, host and start time to LOCK_FILE (read by a refused second writer). Best effort:
    the flock is the lock, the record only names its holder, so a full disk here is left to the run's next write
    (config.yaml), which reports it in one line."""
    since = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    path = Path(directory) / LOCK_FILE
    tmp = path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(record)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


class DeferredFileHandler(logging.FileHandler):
    """Hydra's job log file handler (configs/config.yaml, hydra.job_logging), holding records in memory until the
    run is accepted (`accept_logs`). A command refused before that leaves the file untouched; its messages still
    reach the console."""

    _live: "weakref.WeakSet[DeferredFileHandler]" = weakref.WeakSet()

    def __init__(self, filename, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.accepted, self.pending = False, []
        DeferredFileHandler._live.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.accepted:
            super().emit(record)
        else:
            self.pending.append(record)

    def accept(self) -> None:
        self.accepted = True
        pending, self.pending = self.pending, []
        for record in pending:
            super().emit(record)

    def close(self) -> None:
        DeferredFileHandler._live.discard(self)  # a later job's accept must not reopen this job's file
        self.pending = []
        super().close()


def accept_logs() -> None:
    for handler in list(DeferredFileHandler._live):
        handler.accept()


def _log_open(path: Path) -> bool:
    return any(isinstance(h, logging.FileHandler) and not isinstance(h, DeferredFileHandler)
               and Path(h.baseFilename) == path.absolute() for h in logging.getLogger().handlers)


def start_over(run_dir: Path) -> List[str]:
    """Remove what an earlier run left in `run_dir` before its first checkpoint; returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for name in STALE_FILES:
        p = run_dir / name
        if name == "trainrun.log" and _log_open(p):
            continue  # written by this process (a log handler that is not deferred): it belongs to this run
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(name)
    for name in STALE_DIRS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name + "/")
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name in ("latest", "best") or p.name.startswith((".tmp-", ".old-", ".badstep-", ".latest.", ".best.")) \
                    or p.name.endswith(".badstep"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(f"checkpoints/{p.name}")
    return removed


def write_config(run_dir: Path, text: str) -> None:
    """config.yaml, replaced atomically: it always holds the config of the process now writing the run."""
    from trainrun.checkpoint import _write_text_atomic  # via .config.yaml.tmp, fsynced, renamed

    _write_text_atomic(Path(run_dir) / CONFIG_FILE, text)


def accept(run_dir: Path, config_yaml: str, fresh: bool, main_process: bool) -> Optional[List[str]]:
    """The run passed every check: a fresh run clears an earlier checkpoint-less attempt's files, config.yaml is
    (re)written, and the log file opens. Returns what was cleared (main process), else None."""
    removed = None
    if main_process:
        removed = start_over(run_dir) if fresh else []
        record_holder(run_dir)
        write_config(run_dir, config_yaml)
    accept_logs()
    return removed



class SweepLock(Callback):
    """Hydra callback (configs/config.yaml): a `-m` sweep holds the lock on its directory before Hydra writes
    anything there, so the same named sweep launched twice ends in one line."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from trainrun import distributed
        from trainrun.cli import _fail

        err = None
        if distributed.env_info().is_main:
            try:
                lock(Path(config.hydra.sweep.dir), "sweep directory", "wait for that sweep to finish (or stop it); "
                     "re-running the same command then skips its completed jobs")
                record_holder(Path(config.hydra.sweep.dir))
            except ConfigError as e:
                err = str(e)
        err = distributed.broadcast_object(err)
        if err:
            _fail(err)
