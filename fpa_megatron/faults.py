"""Fault injection for tests and drills only: the environment variable FPA_FAULT, never a config key.

    FPA_FAULT=nan_loss@12          the LM loss of step 12 is NaN (so are its gradients)
    FPA_FAULT=nan_loss@12+         ... of every step from 12 on
    FPA_FAULT=spike@12             the LM loss of step 12 is multiplied by SPIKE_FACTOR
    FPA_FAULT=kill_rank@12:1       rank 1 kills itself with SIGKILL as step 12 starts
    FPA_FAULT=kill_node@12:1       rank 1's node is lost as step 12 starts: its launcher (launch/torchrun.sh),
                                   its torchrun agent and the rank itself get SIGKILL (one rank per node: all of it)
    FPA_FAULT=stall_rank@12:1      rank 1 stops doing anything as step 12 starts (a hung rank)
    FPA_FAULT=slow_rank@12+:1      rank 1 sleeps as each step from 12 on starts (a slow rank), SLOW_RANK_FACTOR x
                                   as long as its step before the first slow one took, at least SLOW_RANK_SECONDS
    FPA_FAULT=sigterm@12:1         rank 1 gets SIGTERM as step 12 starts
    FPA_FAULT=sigterm@12:launcher  torchrun gets SIGTERM (it forwards it to every worker)
    FPA_FAULT=slow_save@12         the checkpoint writer of the save of step 12 sleeps SLOW_SAVE_S before each file
    FPA_FAULT=kill_in_save@12      every rank kills itself (SIGKILL) while writing the checkpoint of step 12: after
                                   its first file, before the others and before any marker
    FPA_FAULT=fail_save@12:1       rank 1 cannot write its first file of the checkpoint of step 12 (a directory
                                   is in the way of the file, so the write itself fails)

Several faults: comma-separated. Steps count from 1 (the step the log line calls `step 12/N`). `:R` picks
the rank; without it, loss and save faults hit every rank and the others rank 0. The save faults act in the
checkpoint writer (`checkpoint_write`; the background thread under checkpoint.async_save). Under torchrun the
faults fire only in the first attempt (TORCHELASTIC_RESTART_COUNT = 0), so a restarted group runs clean. Unset:
a no-op.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from fpa_megatron.run_log import get_logger

ENV = "FPA_FAULT"
LOSS_FAULTS = ("nan_loss", "spike")
PROCESS_FAULTS = ("kill_rank", "kill_node", "stall_rank", "slow_rank", "sigterm")
SAVE_FAULTS = ("slow_save", "kill_in_save", "fail_save")
SPIKE_FACTOR = 100.0
SLOW_RANK_FACTOR, SLOW_RANK_SECONDS = 2.0, 1.0  # the slow rank's step is then >= 3x the others'
SLOW_SAVE_S = 0.5
LAUNCHER = "launcher"

_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?P<onward>\+)?(?::(?P<target>\d+|launcher))?$")
log = get_logger("faults")


@dataclass(frozen=True)
class Fault:
    kind: str  # one of LOSS_FAULTS + PROCESS_FAULTS + SAVE_FAULTS
    step: int
    onward: bool = False  # also every later step
    target: Union[int, str, None] = None  # a rank, LAUNCHER, or None (loss, save faults: every rank; others: rank 0)

    def fires(self, step: int, rank: int) -> bool:
        if not (step == self.step or (self.onward and step > self.step)):
            return False
        if self.target is None:
            return self.kind in LOSS_FAULTS + SAVE_FAULTS or rank == 0
        return self.target == rank or (self.target == LAUNCHER and rank == 0)


def parse(spec: str) -> list[Fault]:
    """'nan_loss@3,kill_rank@4:1' -> [Fault('nan_loss', 3), Fault('kill_rank', 4, target=1)]."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _SPEC.match(item)
        if match is None or match["kind"] not in LOSS_FAULTS + PROCESS_FAULTS + SAVE_FAULTS:
            raise ValueError(f"{ENV}={spec!r}: cannot read {item!r}; expected KIND@STEP[+][:RANK] with KIND one of "
                             f"{', '.join(LOSS_FAULTS + PROCESS_FAULTS + SAVE_FAULTS)}")
        target = match["target"]
        if target == LAUNCHER and match["kind"] != "sigterm":
            raise ValueError(f"{ENV}={spec!r}: only sigterm can target the launcher")
        if int(match["step"]) < 1:
            raise ValueError(f"{ENV}={spec!r}: steps count from 1")
        faults.append(Fault(match["kind"], int(match["step"]), bool(match["onward"]),
                            int(target) if target and target.isdigit() else target))
    return faults


class FaultInjector:
    """Fires the faults of FPA_FAULT meant for this rank; `begin_step(step)` once per step."""

    def __init__(self, faults: list[Fault], rank: int, stop_requested: Callable[[], bool] = lambda: False):
        self.faults, self.rank, self.stop_requested = faults, rank, stop_requested
        self.loss_factor = 1.0
        self._step_started: Optional[float] = None  # when the last step began (slow_rank times the steps)
        self._last_step_seconds = 0.0  # how long the last step took on this rank (0.0 before the second)
        self._slow_seconds: Optional[float] = None  # slow_rank's sleep, fixed when it first fires

    @classmethod
    def from_env(cls, rank: int, stop_requested: Callable[[], bool] = lambda: False) -> "FaultInjector":
        faults = parse(os.environ.get(ENV, ""))
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if faults and attempt > 0:
            log.warning(f"{ENV} ignored: this is torchrun's restart attempt {attempt}")
            faults = []
        if faults and rank == 0:
            log.warning(f"{ENV}={os.environ[ENV]}: fault injection is on (tests and drills only)")
        return cls(faults, rank, stop_requested)

    def begin_step(self, step: int) -> None:
        self.loss_factor = 1.0
        previous, self._step_started = self._step_started, time.monotonic()
        if previous is not None:
            self._last_step_seconds = self._step_started - previous
        for fault in self.faults:
            if fault.kind not in SAVE_FAULTS and fault.fires(step, self.rank):
                self._fire(fault, step)

    def checkpoint_write(self, step: int, file, index: int) -> None:
        """The checkpoint writer is about to write `file`, this rank's `index`-th file of the save of `step`."""
        for fault in self.faults:
            if fault.kind not in SAVE_FAULTS or not fault.fires(step, self.rank):
                continue
            if fault.kind == "slow_save":
                time.sleep(SLOW_SAVE_S)
            elif fault.kind == "kill_in_save" and index == 1:
                log.warning(f"{ENV}: rank {self.rank} kills itself (SIGKILL) while writing checkpoint {file.parent}")
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.kind == "fail_save" and index == 0:
                file.mkdir(parents=True, exist_ok=True)  # the open for writing now fails, naming the file

    def _fire(self, fault: Fault, step: int) -> None:
        if fault.kind == "nan_loss":
            self.loss_factor = math.nan
        elif fault.kind == "spike":
            self.loss_factor = SPIKE_FACTOR
        elif fault.kind == "kill_rank":
            log.warning(f"{ENV}: rank {self.rank} kills itself (SIGKILL) at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "kill_node":
            if "TORCHELASTIC_RUN_ID" not in os.environ:
                raise RuntimeError(f"{ENV}: kill_node@{step} needs torchrun (launch/torchrun.sh)")
            log.warning(f"{ENV}: rank {self.rank} kills its node (agent pid {os.getppid()} and itself) at step {step}")
            launcher = os.environ.get("FPA_LAUNCHER_PID")  # launch/torchrun.sh, which waits for the agent
            if launcher:
                os.kill(int(launcher), signal.SIGKILL)
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "stall_rank":
            log.warning(f"{ENV}: rank {self.rank} stalls at step {step}")
            while True:  # a hung rank: ignores everything but SIGKILL
                time.sleep(3600)
        elif fault.kind == "slow_rank":
            if self._slow_seconds is None:  # first time: the last step was a normal one
                self._slow_seconds = max(SLOW_RANK_SECONDS, SLOW_RANK_FACTOR * self._last_step_seconds)
                log.warning(f"{ENV}: rank {self.rank} sleeps {self._slow_seconds:.2f} s as each step starts, "
                            f"from step {step} on")
            time.sleep(self._slow_seconds)
        elif fault.kind == "sigterm":
            self._sigterm(fault, step)

    def _sigterm(self, fault: Fault, step: int) -> None:
        if fault.target != LAUNCHER:
            log.warning(f"{ENV}: SIGTERM to rank {self.rank} at step {step}")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            raise RuntimeError(f"{ENV}: sigterm@{step}:launcher needs torchrun (launch/torchrun.sh)")
        log.warning(f"{ENV}: SIGTERM to the launcher (pid {os.getppid()}) at step {step}")
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 60  # wait for the forwarded signal, so the stop step is this one
        while not self.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)


_active: Optional[FaultInjector] = None


def install(rank: int, stop_requested: Callable[[], bool] = lambda: False) -> FaultInjector:
    """Read FPA_FAULT for this rank and make it the injector that `loss_factor()` consults."""
    global _active
    _active = FaultInjector.from_env(rank, stop_requested)
    return _active


def loss_factor() -> float:
    """What the LM loss of this micro-batch is multiplied by: 1.0 unless a loss fault fires at this step.

    Only training steps are hit: evaluation runs without autograd.
    """
    if _active is None or not torch.is_grad_enabled():
        return 1.0
    return _active.loss_factor


def checkpoint_write(step: int, file, index: int) -> None:
    """Called by the checkpoint writer before each file it writes (the save faults); nothing unless set."""
    if _active is not None:
        _active.checkpoint_write(step, file, index)
