"""trainer.profile=true: a torch.profiler trace of a window of training steps, viewable in TensorBoard's profiler
plugin or Perfetto (ui.perfetto.dev opens the .pt.trace.json), a per-op summary table, and on CUDA a memory
snapshot (drag it onto pytorch.org/memory_viz). Everything lands in RUN/profile/."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch


class StepProfiler:
    """Profiles optimizer steps [start, start + steps) of this invocation: `step()` after every optimizer step."""

    def __init__(self, run_dir: Path, start: int, steps: int, device: torch.device):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out = Path(run_dir) / "profile"
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        wait = max(0, start - 2)  # one warm-up step before the window, as torch.profiler recommends
        self.profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=min(1, start - 1),
                                                                          active=steps, repeat=1),
                                on_trace_ready=self._ready, record_shapes=True, profile_memory=True)
        self.written: Optional[Dict[str, Path]] = None

    def __enter__(self) -> "StepProfiler":
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profiler.__exit__(*exc)
        if self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def step(self) -> None:
        self.profiler.step()

    def wrap(self, on_step: Optional[Callable[[int, Dict], None]]) -> Callable[[int, Dict], None]:
        """The loop's per-step hook, with the profiler's step added."""
        def hook(step: int, out: Dict) -> None:
            if on_step is not None:
                on_step(step, out)
            self.step()
        return hook

    def _ready(self, prof) -> None:
        from torch.profiler import tensorboard_trace_handler

        tensorboard_trace_handler(str(self.out), worker_name="trainrun")(prof)
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
        (self.out / "ops.txt").write_text(table + "\n")
        self.written = {"trace": next(self.out.glob("trainrun.*.pt.trace.json"), self.out),
                        "ops": self.out / "ops.txt"}
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out / "cuda_memory_snapshot.pickle"))
            self.written["memory"] = self.out / "cuda_memory_snapshot.pickle"
