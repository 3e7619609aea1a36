"""Exit codes of `fpa-train`, defined once; README "Failure handling" lists them.

torchrun restarts a worker group after any non-zero exit of a worker while `--max-restarts` allows it,
but never after torchrun itself was signalled (it forwards the signal, waits, and exits). So a preempted
job (SIGTERM/SIGUSR1 through the launcher) is not restarted by torchrun; the SLURM script requeues it.
"""

from __future__ import annotations

OK = 0  # finished, or stopped at train.exit_interval with a checkpoint
FAILED = 1  # an unexpected error; every failing rank logs "rank R (host H) failed at step S: ..."
CONFIG_ERROR = 2  # the config was rejected before any process group started
PREEMPTED = 75  # SIGTERM or SIGUSR1: the step was finished and a checkpoint saved; rerun or requeue to resume
DIVERGED = 81  # more than train.max_consecutive_skips steps in a row skipped (non-finite loss or gradients, spikes)
LOSS_SPIKE = 82  # a loss spike with train.spike.policy=stop, or more than train.spike.max_rollbacks rollbacks
COLLECTIVE_TIMEOUT = 83  # a collective waited parallel.timeout_minutes: another rank stalled or died

DESCRIPTIONS = {
    OK: "done",
    FAILED: "failed (see the 'failed at step' lines)",
    CONFIG_ERROR: "config error",
    PREEMPTED: "preempted: stopped with a checkpoint, rerun to resume",
    DIVERGED: "diverged: too many consecutive skipped steps",
    LOSS_SPIKE: "stopped on a loss spike",
    COLLECTIVE_TIMEOUT: "a collective timed out (parallel.timeout_minutes)",
}


class RunStopped(Exception):
    """The run stopped on purpose (preemption, divergence, a spike); `exit_code` says why."""

    exit_code = FAILED

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Preempted(RunStopped):
    exit_code = PREEMPTED


class Diverged(RunStopped):
    exit_code = DIVERGED


class LossSpikeStop(RunStopped):
    exit_code = LOSS_SPIKE
