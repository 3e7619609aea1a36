"""Where a stalled run was: every rank's Python stacks in the run directory before the collective timeout.

At the start of every step each rank arms `faulthandler.dump_traceback_later` for `STALL_FRACTION` of
`parallel.timeout_minutes`. A step that finishes in time re-arms it; one that does not (a rank hung in anything,
the others waiting for it in a collective) makes faulthandler's own thread write every thread's stack of that
rank to `<run dir>/stacks/rank<R>.txt`, the hung rank's included, before the timeout fails the others. The
failure line then says where the stacks are. A rank whose file stayed empty removes it at the end.

A stop signal (SIGTERM, SIGUSR1) also makes each rank that gets it write its stacks, at once, to
`<run dir>/stacks/rank<R>.stop_signal.txt` (faulthandler's C handler, then the run's own: a rank blocked in a
collective writes them too). A launcher kills ranks that do not stop within its grace period (torchrun's
--shutdown-timeout), often before the collective timeout: then these files show where a stuck rank was. A rank
that stops cleanly (it saved the step: `Preempted`) removes its file; a failure line after a stop signal names them.
"""

from __future__ import annotations

import faulthandler
from typing import Optional

from fpa_megatron.config import RunConfig, run_dir
from fpa_megatron.exit_codes import Preempted
from fpa_megatron.run_log import where
from fpa_megatron.training.preemption import STOP_SIGNALS

STALL_FRACTION = 0.9  # of parallel.timeout_minutes: the stacks are written before the collective gives up


class StallWatchdog:
    def __init__(self, cfg: RunConfig, rank: int):
        self.seconds = STALL_FRACTION * cfg.parallel.timeout_minutes * 60
        self.path = run_dir(cfg) / "stacks" / f"rank{rank}.txt"
        self.at_signal = self.path.with_name(f"rank{rank}.stop_signal.txt")
        self._file = self._signal_file = None

    def at_step(self, step: int) -> None:
        """Called as each step starts: the countdown starts again."""
        faulthandler.dump_traceback_later(self.seconds, repeat=False, file=self._file, exit=False)

    def __enter__(self) -> "StallWatchdog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file, self._signal_file = open(self.path, "w"), open(self.at_signal, "w")
        for sig in STOP_SIGNALS:  # chain: the handler installed before (StopSignals') runs after the dump
            faulthandler.register(sig, file=self._signal_file, all_threads=True, chain=True)
        where.stacks, where.stacks_at_signal = str(self.path), str(self.at_signal)
        return self

    def __exit__(self, exc_type: Optional[type], *exc) -> None:
        faulthandler.cancel_dump_traceback_later()
        for sig in STOP_SIGNALS:
            faulthandler.unregister(sig)
        self._file.close()
        self._signal_file.close()
        stopped_cleanly = exc_type is None or issubclass(exc_type, Preempted)
        for path, keep in ((self.path, True), (self.at_signal, not stopped_cleanly)):
            if path.stat().st_size == 0 or not keep:  # nothing stalled, or the stop went through: no file left
                path.unlink()
        try:
            self.path.parent.rmdir()  # the last rank out removes the directory
        except OSError:
            pass
