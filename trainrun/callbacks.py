"""Callbacks: user code that runs at fixed points of training, with state that checkpoints carry.

A callback is any object with some of these methods (subclass `Callback` for the no-op defaults):

    on_fit_start(run)                      once, before the first step of this invocation (also after a resume)
    on_step_end(run, step, metrics)        after every optimizer step; metrics: {"train/loss", "lr"} of that step
    on_eval_end(run, step, metrics)        after every evaluation; metrics: the val/* values
    on_checkpoint(run, step, path)         after a checkpoint of `step` is complete on disk (main process only)
    on_fit_end(run, metrics)               once, when this invocation ends normally (finished or stopped)
    state_dict() / load_state_dict(state)  saved in every checkpoint under callbacks/<name>, restored exactly

`run` is the `trainrun.build.Run` bundle (run.model, run.optimizer, run.cfg, run.dir, run.state, ...). Callbacks
are configured by name (`callbacks: {counter: {_target_: mypkg.Counter, every: 10}}`); the name is the key of
the callback's state in checkpoints. An exception raised by a callback ends the run with one line naming it
(CallbackError); checkpoints already written stay intact.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Tuple

from trainrun.errors import TrainrunError

HOOKS = ("on_fit_start", "on_step_end", "on_eval_end", "on_checkpoint", "on_fit_end")


class CallbackError(TrainrunError):
    exit_code = 1


class Callback:
    """No-op defaults for every hook; override the ones you need."""

    def on_fit_start(self, run) -> None:
        pass

    def on_step_end(self, run, step: int, metrics: Dict[str, float]) -> None:
        pass

    def on_eval_end(self, run, step: int, metrics: Dict[str, float]) -> None:
        pass

    def on_checkpoint(self, run, step: int, path) -> None:
        pass

    def on_fit_end(self, run, metrics: Dict[str, float]) -> None:
        pass


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class Callbacks:
    """The configured callbacks in order; `call(hook, ...)` runs the hook of each that has it."""

    def __init__(self, named: Mapping[str, Any]):
        self.named: Dict[str, Any] = dict(named)
        self.wants_step_metrics = any(callable(getattr(c, "on_step_end", None)) and
                                      type(c).on_step_end is not Callback.on_step_end for c in self.named.values())

    def __bool__(self) -> bool:
        return bool(self.named)

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        return iter(self.named.items())

    def call(self, hook: str, *args) -> None:
        for name, callback in self.named.items():
            method = getattr(callback, hook, None)
            if method is None:
                continue
            try:
                method(*args)
            except TrainrunError:
                raise
            except Exception as e:  # noqa: BLE001  (user code: any failure ends the run in one line)
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise CallbackError(f"callback {name} ({type(callback).__module__}.{type(callback).__qualname__}) "
                                    f"failed in {hook}: {type(e).__name__}: {text}; the checkpoints written so far "
                                    f"are intact: fix the callback and resume") from e

    def stateful(self) -> Dict[str, Any]:
        return {name: c for name, c in self.named.items() if is_stateful(c)}
