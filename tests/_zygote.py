"""A pre-imported Python that forks one child per `trainrun` command of the test suite.

A `python -m trainrun` process spends ~6 of its ~9 s here importing torch, torch._dynamo (the first optimizer
imports it), Hydra and trainrun. This process imports them once and forks a child per command: the child sets the
command's working directory, argv, sys.path and output files exactly as `python -m trainrun ARGS` would, runs the
module as __main__ and exits through the normal interpreter shutdown (atexit, logging flush), so its exit code,
output and files are those of a fresh process. tests/conftest.py uses it only when the command's environment
equals the one this process started with (anything read from the environment at import time is then the same);
otherwise it starts a real process.

Protocol: one JSON request per line on stdin; replies on the pipe whose fd is argv[1]: {"pid": N} when the child starts, then
{"pid": N, "rc": CODE} when it ends (CODE < 0: killed by that signal, as subprocess reports it).
"""
import importlib
import json
import os
import sys

PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "hydra", "hydra.main", "omegaconf", "trainrun.cli",
           "trainrun.config", "trainrun.build", "trainrun.runner", "trainrun.loop", "trainrun.modes",
           "trainrun.data.datasets", "trainrun.checkpoint", "trainrun.resume", "trainrun.doctor")


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001  (a broken module fails in the child, where the test sees it)
            print(f"zygote: could not preload {name}: {e}", file=sys.stderr)


def _reply(ctl, **msg) -> None:
    ctl.write(json.dumps(msg) + "\n")
    ctl.flush()


def _serve():
    """Fork a child per request; in the child, return the request; in this process, report and loop."""
    ctl = os.fdopen(int(sys.argv[1]), "w")
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            return req
        _reply(ctl, pid=pid)
        _, status = os.waitpid(pid, 0)
        _reply(ctl, pid=pid, rc=os.waitstatus_to_exitcode(status))
    sys.exit(0)


def _become(req) -> None:
    """Turn this fork into `python -m MODULE ARGS` (or `python -c CODE`) started in req['cwd']."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.close(null)
    os.setpgid(0, 0)  # a timeout kills the command's whole process group (DataLoader workers included)
    sys.path.insert(0, os.getcwd() if req.get("module") else "")


req = None
if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/); a real `python -m trainrun` has its cwd there instead
    _preload()
    req = _serve()
    _become(req)
    if req.get("module"):
        import runpy

        sys.argv = [req["module"], *req["args"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *req["args"]]
        exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
