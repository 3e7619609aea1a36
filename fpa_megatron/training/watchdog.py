"""Where a stalled run was: every rank's Python stacks in the run directory before the collective timeout.

At the start of every step each rank arms `faulthandler.dump_traceback_later` for `STALL_FRACTION` of
`parallel.timeout_minutes`. A step that finishes in time re-arms it; one that does not (a rank hung in anything,
the others waiting for it in a collective) makes faulthandler's own thread write every thread's stack of that
rank to `<run dir>/stacks/rank<R>.txt`, the hung rank's included, before the timeout fails the others. The
failure line then says where the stacks are. A rank whose file stayed empty removes it at the end.
"""

from __future__ import annotations

import faulthandler
from fpa_megatron.config import RunConfig, run_dir
from fpa_megatron.run_log import where

STALL_FRACTION = 0.9  # of parallel.timeout_minutes: the stacks are written before the collective gives up


class StallWatchdog:
    def __init__(self, cfg: RunConfig, rank: int):
        self.seconds = STALL_FRACTION * cfg.parallel.timeout_minutes * 60
        self.path = run_dir(cfg) / "stacks" / f"rank{rank}.txt"
        self._file = None

    def at_step(self, step: int) -> None:
        """Called as each step starts: the countdown starts again."""
        faulthandler.dump_traceback_later(self.seconds, repeat=False, file=self._file, exit=False)

    def __enter__(self) -> "StallWatchdog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        where.stacks = str(self.path)
        return self

    def __exit__(self, *exc) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        if self.path.stat().st_size == 0:  # nothing stalled: no empty file left
            self.path.unlink()
            try:
                self.path.parent.rmdir()  # the last rank out removes the directory
            except OSError:
                pass
