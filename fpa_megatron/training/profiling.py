"""Tracing chosen steps with torch.profiler (`profiling.*`), per rank, on its own cadence.

Steps [start_step, start_step + steps) are traced on the ranks in `profiling.ranks`. Each traced rank writes to
`profiling.dir` (default `<run dir>/profile`):
- `rank<R>_steps<A>-<B>.json`: a Chrome trace (chrome://tracing, Perfetto);
- `tensorboard/rank<R>.<time>.pt.trace.json`: the same trace where the TensorBoard profiler plugin (torch-tb-profiler)
  reads it: `tensorboard --logdir DIR/tensorboard`;
- with `profiling.memory`: `rank<R>_cuda_memory.pickle` on GPU (the caching allocator's history, for
  pytorch.org/memory_viz), `rank<R>_cpu_memory.txt` on CPU (the operators by memory allocated).

The project's own work is in named ranges (`torch.profiler.record_function`, free when nothing traces):
`fpa/forward_backward` (Megatron's schedule; its pipeline sends and receives appear inside it as the process
group's own `gloo:send` / `gloo:recv` or `nccl:` events), `fpa/attention/<kernel>` (the kernel that ran:
sdpa, blockwise, triton, eager), `fpa/cp_kv_exchange` and `fpa/cp_grad_scatter` (context parallelism),
`fpa/penalty_reduce`, `fpa/optimizer_step` and `fpa/checkpoint_save`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from fpa_megatron.config import RunConfig, run_dir
from fpa_megatron.run_log import get_logger

log = get_logger("profiling")


class StepProfiler:
    """`at_step(step)` before each step starts tracing at start_step and stops after the last traced step; leaving
    the context (the end of training, an early exit, a failure) stops it too."""

    def __init__(self, cfg: RunConfig, rank: int):
        p = cfg.profiling
        self.start, self.stop = p.start_step, p.start_step + p.steps
        self.enabled = p.start_step > 0 and rank in p.ranks
        self.memory, self.rank = p.memory, rank
        self.out = Path(p.dir) if p.dir else run_dir(cfg) / "profile"
        self._profile: Optional[profile] = None
        self._first = self._last = 0

    def at_step(self, step: int) -> None:
        """Called with the number of the step about to run (1-based)."""
        if not self.enabled:
            return
        if self._profile is not None and step < self.stop:
            self._last = step
        elif self._profile is not None:
            self._finish(step - 1)
        elif self._profile is None and self.start <= step < self.stop:
            self._begin(step)

    def _begin(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, profile_memory=self.memory, record_shapes=self.memory)
        if self.memory and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history()
        self._profile.__enter__()
        self._first = self._last = step

    def _finish(self, last: int) -> None:
        trace, self._profile = self._profile, None
        trace.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        # the trace can be saved once: in the TensorBoard plugin's layout, then copied under a name that says what
        board = self.out / "tensorboard"
        tensorboard_trace_handler(str(board), worker_name=f"rank{self.rank}")(trace)
        saved = max(board.glob(f"rank{self.rank}.*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
        chrome = self.out / f"rank{self.rank}_steps{self._first}-{last}.json"
        shutil.copyfile(saved, chrome)
        written = [chrome.name, f"tensorboard/{saved.name}"]
        if self.memory and torch.cuda.is_available():
            snapshot = self.out / f"rank{self.rank}_cuda_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot.name)
        elif self.memory:
            table = trace.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=50)
            (self.out / f"rank{self.rank}_cpu_memory.txt").write_text(table + "\n")
            written.append(f"rank{self.rank}_cpu_memory.txt")
        log.info(f"profiled steps {self._first}-{last} on rank {self.rank}: {', '.join(written)} in {self.out}")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        if self._profile is not None:
            self._finish(self._last)
