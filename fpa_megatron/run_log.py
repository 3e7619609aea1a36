"""Run logs a cluster user can debug: Python `logging`, a timestamp and the rank on every line.

`setup_logging(rank)` configures the `fpa_megatron` logger once per process: rank 0 prints progress (INFO,
to stdout), every rank prints warnings and errors (to stderr). `where` remembers this process's rank, host
and current step, so that a failure is reported in one line that names them (`failure_line`):

    2026-11-29 03:12:44 [rank 3] ERROR: rank 3 (host node07) failed at step 812: ...
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Optional

LOGGER_NAME = "fpa_megatron"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass
class Where:
    """What a failure line names: this process's rank and host, and the step being run (None: setup)."""

    rank: int = 0
    host: str = socket.gethostname()
    step: Optional[int] = None
    node: int = 0  # torchrun's node rank (GROUP_RANK)
    # node rank -> (host, its ranks), for the whole job (`record_job_nodes`); empty until then
    nodes: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    stacks: Optional[str] = None  # this rank's stall watchdog file (training/watchdog.py), once armed
    stacks_at_signal: Optional[str] = None  # ... and its file for the stacks at a stop signal


where = Where()


class _ConsoleHandler(logging.Handler):
    """Writes to sys.stdout / sys.stderr as they are at the time of the call (test capture swaps them)."""

    def __init__(self, stream_name: str, min_level: int, max_level: int):
        super().__init__()
        self.stream_name, self.min_level, self.max_level = stream_name, min_level, max_level

    def filter(self, record: logging.LogRecord) -> bool:
        return self.min_level <= record.levelno < self.max_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


class _Formatter(logging.Formatter):
    """`<time> [rank R] message`; warnings and errors also carry their level."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        text = f"{self.formatTime(record, DATE_FORMAT)} [rank {where.rank}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(rank: Optional[int] = None) -> logging.Logger:
    """Configure the `fpa_megatron` logger for this rank (default: $RANK, else 0); safe to call again."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    where.rank = rank
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        formatter = _Formatter()
        for handler in (_ConsoleHandler("stdout", logging.DEBUG, logging.WARNING),
                        _ConsoleHandler("stderr", logging.WARNING, logging.CRITICAL + 1)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.propagate = False  # Megatron and DeepSpeed configure the root logger their own way
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    """A child of the run logger (configured with the defaults if nobody did yet)."""
    if not logging.getLogger(LOGGER_NAME).handlers:
        setup_logging()
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def is_collective_timeout(err: BaseException) -> bool:
    """gloo raises RuntimeError('... Timed out waiting 6000ms for recv ...'); NCCL's watchdog says 'timeout'."""
    return isinstance(err, RuntimeError) and bool(_TIMEOUT.search(str(err)))


_PEER_LOST = re.compile(r"by peer|connection refused|broken pipe", re.IGNORECASE)


def record_job_nodes(node: int, nodes: dict[int, tuple[str, list[int]]]) -> None:
    """Remember this process's node and every node of the job, so that a failure line can name the others."""
    where.node, where.nodes = node, nodes


def _other_nodes() -> str:
    """'node 1 (host h1, rank 1)' for every node of the job but this one; '' on a one-node job."""
    others = [f"node {node} (host {host}, rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))})"
              for node, (host, ranks) in sorted(where.nodes.items()) if node != where.node]
    return ", ".join(others)


def failure_line(err: BaseException, timeout_minutes: Optional[float] = None) -> str:
    """One line naming the rank, host and step that failed, and why; when a peer was lost or stalled on a
    multi-node job, also the other nodes (on a two-node job, the lost one)."""
    at = f"at step {where.step}" if where.step is not None else "during setup"
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    timed_out = timeout_minutes is not None and is_collective_timeout(err)
    if timed_out:
        reason = (f"a collective did not complete within parallel.timeout_minutes={timeout_minutes:g} "
                  f"({timeout_minutes * 60:g} s): another rank stalled or died ({reason})")
    others = _other_nodes()
    if others and (timed_out or _PEER_LOST.search(str(err))):
        lost = "the lost or stalled peer is on" if len(where.nodes) == 2 else "a peer was lost or stalled on one of"
        reason = f"{lost} {others}: {reason}"
    line = f"rank {where.rank} (host {where.host}) failed {at}: {reason}"
    if timed_out and _written(where.stacks):
        line += f"; every rank's Python stacks at the stall: {os.path.dirname(where.stacks)}/"
    elif _written(where.stacks_at_signal):
        line += f"; the Python stacks at the stop signal: {os.path.dirname(where.stacks_at_signal)}/"
    return line


def _written(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(path) and os.path.getsize(path) > 0
