import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Small, fast defaults for end-to-end runs: a handful of steps on the real digits data.
FAST = ["logger.progress=lines", "logger.log_every=5", "logger.plots=false"]


def run_cli(cwd: Path, *args: str, check: bool = True, entry: str = "trainrun", timeout: int = 600):
    """Run the CLI exactly as a user would (`python -m trainrun ...`) inside `cwd`."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if entry == "trainrun":
        p = trainrun_process(args, cwd, env, timeout)
    else:
        code = "from trainrun.cli import list_recipes_main; list_recipes_main()"
        p = trainrun_process(args, cwd, env, timeout, code=code)
    if check and p.returncode != 0:
        raise AssertionError(f"trainrun {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def trainrun_process(args, cwd, env, timeout: int = 600, code: str = None) -> subprocess.CompletedProcess:
    """`python -m trainrun ARGS` (or `python -c CODE ARGS`) in `cwd` with exactly `env`, output captured as text:
    forked from a pre-imported Python started with the same environment (tests/_zygote.py; it saves the ~6 s of
    imports a fresh process spends), or a fresh process with TRAINRUN_TEST_FRESH_PROCESSES=1."""
    env = {k: str(v) for k, v in env.items()}
    req = {"module": "trainrun", "args": list(args)} if code is None else {"code": code, "args": list(args)}
    zygote = None if os.environ.get("TRAINRUN_TEST_FRESH_PROCESSES") == "1" or not hasattr(os, "fork") \
        else _ZYGOTES.take(env)
    if zygote is None:
        cmd = [sys.executable, "-m", "trainrun", *args] if code is None else [sys.executable, "-c", code, *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        return zygote.run(req, cwd, env, timeout)
    finally:
        _ZYGOTES.give_back(zygote)


class _Zygote:
    """A pre-imported trainrun Python (tests/_zygote.py) started with one environment."""

    def __init__(self, env):
        read, write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_zygote.py")), str(write)],
                                     env=env, stdin=subprocess.PIPE, text=True, pass_fds=(write,))
        os.close(write)
        self.replies = os.fdopen(read)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.replies.close()

    def run(self, req, cwd, env, timeout):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="trainrun-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            self.start(req, cwd, env, out, err)
            rc = self.finish(timeout)
            return subprocess.CompletedProcess(["trainrun", *req["args"]], rc,
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def start(self, req, cwd, env, out: Path, err: Path) -> int:
        """Fork the command (its output to the files `out`, `err`); returns the child's pid, which leads its own
        process group."""
        self.proc.stdin.write(json.dumps({**req, "cwd": str(Path(cwd).absolute()), "env": env,
                                          "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        self.pid = json.loads(self.replies.readline())["pid"]
        return self.pid

    def finished(self) -> bool:
        import select

        return bool(select.select([self.replies], [], [], 0)[0])

    def finish(self, timeout, kill_on_timeout: bool = True) -> int:
        """The started command's exit code; on a timeout its process group is killed (or, with
        kill_on_timeout=False, left running) and subprocess.TimeoutExpired raised."""
        import select
        import signal

        ready, _, _ = select.select([self.replies], [], [], timeout)
        if not ready:
            if not kill_on_timeout:
                raise subprocess.TimeoutExpired(["trainrun"], timeout)
            os.killpg(self.pid, signal.SIGKILL)
            self.replies.readline()
            raise subprocess.TimeoutExpired(["trainrun"], timeout)
        return json.loads(self.replies.readline())["rc"]


class _ZygotePool:
    """Idle zygotes by environment; one command at a time each (tests that run commands from threads get one per
    thread). At most 6 are kept: the least recently used idle one is closed first. An environment seen for the
    first time (a test's own TORCH_HOME, say) gets a fresh process: a zygote pays off from the second command."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.idle = []  # (env key, zygote), least recently used first
        self.busy = 0
        self.seen = set()

    def take(self, env) -> Optional[_Zygote]:
        # pytest sets PYTEST_CURRENT_TEST to the test's id and phase, a new value for every test: keyed with it, a
        # zygote served only the commands of one test. Nothing preloaded reads it; the child gets the command's own.
        key = tuple(sorted((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST"))
        with self.lock:
            if key not in self.seen:
                self.seen.add(key)
                return None
            for i, (k, z) in enumerate(self.idle):
                if k == key and z.alive():
                    del self.idle[i]
                    self.busy += 1
                    return z
            while self.idle and len(self.idle) + self.busy >= 6:
                self.idle.pop(0)[1].close()
            self.busy += 1
        z = _Zygote(env)
        z.key = key
        return z

    def give_back(self, z: _Zygote) -> None:
        with self.lock:
            self.busy -= 1
            self.idle.append((z.key, z))


_ZYGOTES = _ZygotePool()


def cli_env(**extra) -> dict:
    """The environment run_cli gives a command (plus `extra`): a background command started with it is forked from
    the same zygote as run_cli's commands."""
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


class CliProcess:
    """`python -m trainrun ARGS` in the background, for signal and kill tests: a subset of Popen (pid, poll, wait,
    send_signal, kill, communicate) over a command forked from a zygote when one matches `env` (see
    trainrun_process), else a fresh process. Either way it leads its own process group (os.killpg(pid, ...)
    reaches its workers) and its stdout and stderr go to files, read back (and appended to `log`, if given) when it
    has ended. A forked command is a real process: a signal or SIGKILL acts on it as on a fresh one."""

    def __init__(self, cwd: Path, args, env: Optional[dict] = None, log: Optional[Path] = None):
        import tempfile

        env = {k: str(v) for k, v in (env if env is not None else cli_env()).items()}
        self.args, self.log, self.returncode, self.stdout, self.stderr = list(args), log, None, None, None
        self.tmp = tempfile.TemporaryDirectory(prefix="trainrun-bg-")
        self.out, self.err = Path(self.tmp.name, "stdout"), Path(self.tmp.name, "stderr")
        self.zygote = None if os.environ.get("TRAINRUN_TEST_FRESH_PROCESSES") == "1" or not hasattr(os, "fork") \
            else _ZYGOTES.take(env)
        if self.zygote is None:
            with open(self.out, "w") as out, open(self.err, "w") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", "trainrun", *self.args], cwd=cwd, env=env,
                                             stdout=out, stderr=err, start_new_session=True)
            self.pid = self.proc.pid
        else:
            try:
                self.pid = self.zygote.start({"module": "trainrun", "args": self.args}, cwd, env, self.out, self.err)
            except BaseException:
                _ZYGOTES.give_back(self.zygote)
                raise

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            if self.zygote is None:
                if self.proc.poll() is not None:
                    self._ended(self.proc.returncode)
            elif self.zygote.finished():
                self._ended(self.zygote.finish(0))
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            if self.zygote is None:
                self._ended(self.proc.wait(timeout))
            else:
                self._ended(self.zygote.finish(timeout, kill_on_timeout=False))
        return self.returncode

    def communicate(self, timeout: Optional[float] = None):
        self.wait(timeout)
        return self.stdout, self.stderr

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def _ended(self, rc: int) -> None:
        if self.zygote is not None:
            _ZYGOTES.give_back(self.zygote)
        self.returncode = rc
        self.stdout, self.stderr = self.out.read_text(errors="replace"), self.err.read_text(errors="replace")
        self.tmp.cleanup()
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(self.stdout + self.stderr)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs a script's main() or a run in-process may set torch's thread count for the whole worker
    (bench scripts, trainer.threads); later tests compare against the default, so put it back."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def read_jsonl(path: Path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sha_of(run_dir: Path, step: int) -> str:
    return (Path(run_dir) / "checkpoints" / f"step_{step:09d}" / "state.pt.sha256").read_text().split()[0]


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(tmp_path, *args, *FAST, **kw)
    _run.dir = tmp_path
    return _run


def structured(schema, **values):
    """A typed config node of `schema` (a trainrun.config dataclass) with some fields set."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(schema)
    for k, v in values.items():
        cfg[k] = v
    return cfg
