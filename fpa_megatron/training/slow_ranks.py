"""A slow rank, named: the rank whose steps take longer than the others', step after step.

Each rank times its step from the step's start to the end of its forward/backward schedule, i.e. up to the
step's first reduction over the data-parallel ranks (the loss all-reduce; ZeRO-1 reduces the gradients in the
optimizer step), and the time it waited for its micro-batches. Both travel in the guard's one all-reduce per
step (training/guard.py: `rank_seconds`), so every rank knows every rank's times without a collective of its own.

A rank whose step time is above train.slow_rank.factor x the median of the other ranks' for train.slow_rank.steps
steps in a row is named once, by itself (it knows its host and coordinates; every rank prints warnings):

    [rank 1] WARNING: step 14: slow rank: rank 1 (host node03, TP 0, CP 0, PP 0, DP 1): its step took 3.02 s,
    3.1 x the median of the other ranks (0.97 s), 5 steps in a row (train.slow_rank.factor=2); its data wait 0.01 s

and once more when it is no longer slow. The logging rank writes the `ranks/` scalars (`MetricsLogger.log_ranks`).
The time covers whatever holds a rank up before the step's first reduction: its host, its data, its device.
Collectives inside the schedule (tensor, context or pipeline parallelism; ZeRO-2's gradient reduction in the
backward) make the ranks that wait there for a slow one take as long: then its whole group is named together
(its TP group, say), or, with ZeRO-2, no rank stands out by its step time and only its data wait shows it.
"""

from __future__ import annotations

import statistics

from megatron.core import parallel_state

from fpa_megatron.config import SlowRankConfig
from fpa_megatron.run_log import get_logger, where
from fpa_megatron.training.guard import TrainingGuard
from fpa_megatron.training.metrics import MetricsLogger

log = get_logger("slow_ranks")


def ratios_to_the_others(seconds: list[float]) -> list[float]:
    """Each rank's time over the median of the other ranks' (1.0 where that median is 0)."""
    ratios = []
    for rank, own in enumerate(seconds):
        others = statistics.median(seconds[:rank] + seconds[rank + 1:])
        ratios.append(own / others if others > 0 else 1.0)
    return ratios


class SlowRanks:
    """Judges the step times the guard gathered, after each step; names this rank when it is the slow one."""

    def __init__(self, cfg: SlowRankConfig, guard: TrainingGuard, logger: MetricsLogger, rank: int,
                 coordinates: str):
        self.factor, self.steps = cfg.factor, cfg.steps
        self.guard, self.logger, self.rank, self.coordinates = guard, logger, rank, coordinates
        self.streaks: list[int] = []  # per rank: steps in a row above factor x the others' median

    @classmethod
    def for_run(cls, cfg: SlowRankConfig, guard: TrainingGuard, logger: MetricsLogger, rank: int) -> "SlowRanks":
        coordinates = (f"TP {parallel_state.get_tensor_model_parallel_rank()}, "
                       f"CP {parallel_state.get_context_parallel_rank()}, "
                       f"PP {parallel_state.get_pipeline_model_parallel_rank()}, "
                       f"DP {parallel_state.get_data_parallel_rank()}")
        return cls(cfg, guard, logger, rank, coordinates)

    def after_step(self, step: int, final: bool = False) -> dict:
        """Update the streaks with the last step's times; the line and the `ranks/` scalars. Nothing when the
        guard gathered no times (train.slow_rank off, a single rank, or step 0)."""
        times = self.guard.rank_seconds
        if step == 0 or not times:
            return {}
        seconds, waits = [t for t, _ in times], [w for _, w in times]
        ratios = ratios_to_the_others(seconds)
        was_named = [streak >= self.steps for streak in self.streaks] or [False] * len(times)
        self.streaks = [streak + 1 if ratio > self.factor else 0
                        for streak, ratio in zip(self.streaks or [0] * len(times), ratios)]
        named = [streak >= self.steps for streak in self.streaks]
        me = self.rank
        if named[me] and not was_named[me]:
            others = statistics.median(seconds[:me] + seconds[me + 1:])
            log.warning(f"step {step}: slow rank: rank {me} (host {where.host}, {self.coordinates}): its step took "
                        f"{seconds[me]:.2f} s, {ratios[me]:.1f} x the median of the other ranks ({others:.2f} s), "
                        f"{self.steps} steps in a row (train.slow_rank.factor={self.factor:g}); its data wait "
                        f"{waits[me]:.2f} s")
        elif was_named[me] and not named[me]:
            log.warning(f"step {step}: rank {me} (host {where.host}, {self.coordinates}) is no longer slow: "
                        f"{ratios[me]:.1f} x the median step time of the other ranks")
        slowest = max(range(len(ratios)), key=ratios.__getitem__)
        values = {"ranks/slowest_step_time_ratio": ratios[slowest], "ranks/slowest_rank": float(slowest),
                  "ranks/slow_ranks": float(sum(named)), "ranks/step_time_s_median": statistics.median(seconds),
                  "ranks/data_wait_s_max": max(waits), "ranks/data_wait_s_median": statistics.median(waits)}
        self.logger.log_ranks(step, values, final=final, changed=named != was_named)
        return {"slowest_step_time_ratio": ratios[slowest], "slow_ranks": sum(named)}
