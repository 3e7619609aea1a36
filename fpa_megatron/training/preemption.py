"""SIGTERM and SIGUSR1 ask the run to stop: finish the step, save a checkpoint, exit with code 75.

The handler only records the request. The guard's per-step all-reduce shares it, so every rank stops after
the same step even when only one rank (or only the launcher) got the signal. torchrun forwards SIGTERM (and
SIGUSR1, with launch/torchrun.sh's --signals-to-handle) to its workers; SLURM sends SIGUSR1 ahead of the time
limit (launch/slurm.sbatch).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from fpa_megatron.run_log import get_logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = get_logger("preemption")


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `received` (the signal's name) instead of ending the process."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            log.warning(f"{name} received: finishing this step, then saving a checkpoint and exiting (code 75)")
            self.received = name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python installs handlers only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        else:
            log.warning("not on the main thread: SIGTERM and SIGUSR1 keep their default action (no clean stop)")
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
