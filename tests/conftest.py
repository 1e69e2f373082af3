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
            self.proc.stdin.write(json.dumps({**req, "cwd": str(Path(cwd).absolute()), "env": env,
                                              "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.replies.readline())["pid"]
            rc = self._wait(pid, timeout)
            return subprocess.CompletedProcess(["trainrun", *req["args"]], rc,
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def _wait(self, pid, timeout) -> int:
        import select
        import signal

        ready, _, _ = select.select([self.replies], [], [], timeout)
        if not ready:
            os.killpg(pid, signal.SIGKILL)
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
        key = tuple(sorted(env.items()))
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
