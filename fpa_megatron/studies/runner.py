"""Run a study's training runs as real `fpa-train` processes, several at once, resumably.

Each `RunSpec` is one training run: `fpa-train --config <base> <overrides>` in a subprocess (one rank:
`python -m fpa_megatron.cli` with the rank variables set; more: torchrun), logging to
`<out>/runs/<name>/` (TensorBoard events, config.yaml, train.log, checkpoints). A run that finished gets
`done.json` there (return code, seconds, command) and is not started again; a run directory without it
(interrupted) is removed and the run starts over. Up to `workers` runs go at once, each with
`threads` intra-op threads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DONE_FILE = "done.json"
LOG_FILE = "train.log"


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: `arm` and `seed` name it; `overrides` are fpa-train's key=value options."""

    arm: str
    seed: int
    overrides: tuple[str, ...]
    values: dict = field(default_factory=dict, compare=False, hash=False)  # the arm's settings, for the report

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.name


def read_done(out: Path, spec: RunSpec) -> Optional[dict]:
    """The run's done.json, or None if it has not finished."""
    path = run_dir(out, spec) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_command(config: Path, spec: RunSpec, out: Path, ranks: int) -> list[str]:
    overrides = [*spec.overrides, f"train.seed={spec.seed}", f"logging.dir={out / 'runs'}",
                 f"logging.run_name={spec.name}"]
    if ranks == 1:
        return [sys.executable, "-m", "fpa_megatron.cli", "--config", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "fpa_megatron.cli", "--config", str(config), *overrides]


class StudyRunner:
    """Starts the runs that have not finished, `workers` at a time; `run_all` returns when all are done."""

    def __init__(self, out: Path, config: Path, workers: int = 2, threads: int = 1, ranks: int = 1,
                 rerun_failed: bool = False):
        if workers < 1 or threads < 1 or ranks < 1:
            raise ValueError(f"workers={workers}, threads={threads} and ranks={ranks} must be >= 1")
        self.out, self.config = out, config
        self.workers, self.threads, self.ranks, self.rerun_failed = workers, threads, ranks, rerun_failed
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def pending(self, specs: list[RunSpec]) -> list[RunSpec]:
        todo = []
        for spec in specs:
            done = read_done(self.out, spec)
            if done is None or (self.rerun_failed and done["returncode"] != 0):
                todo.append(spec)
        return todo

    def run_all(self, specs: list[RunSpec]) -> dict[str, dict]:
        """Run what is pending; return {run name: done.json} for every spec."""
        todo = self.pending(specs)
        print(f"{len(specs) - len(todo)} of {len(specs)} runs already done; running {len(todo)} "
              f"({self.workers} at a time)", flush=True)
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            for future in [pool.submit(self._run_one, spec) for spec in todo]:
                future.result()
        except BaseException:  # Ctrl-C (or a bug here): stop the runs we started, then report it
            self._stop_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return {spec.name: read_done(self.out, spec) for spec in specs}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        if self.ranks == 1:  # what torchrun would set for a single process; port 0: the store picks a free one
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT="0")
        return env

    def _run_one(self, spec: RunSpec) -> None:
        if self._stopping:
            return
        directory = run_dir(self.out, spec)
        if directory.exists():  # an interrupted (or failed, when rerunning) run starts over
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        command = train_command(self.config, spec, self.out, self.ranks)
        start = time.monotonic()
        print(f"  start {spec.name}", flush=True)
        with open(directory / LOG_FILE, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                    start_new_session=True)
            with self._lock:
                self._procs[spec.name] = proc
            returncode = proc.wait()
            with self._lock:
                self._procs.pop(spec.name, None)
        seconds = time.monotonic() - start
        if self._stopping:
            return
        if returncode < 0:  # killed by a signal from outside: not a result, rerun next time
            print(f"  {spec.name}: killed by signal {-returncode}; it will rerun", flush=True)
            return
        done = {"returncode": returncode, "seconds": round(seconds, 1), "command": command}
        (directory / DONE_FILE).write_text(json.dumps(done, indent=2) + "\n")
        status = "done" if returncode == 0 else f"FAILED (exit {returncode}, see {directory / LOG_FILE})"
        print(f"  {status}: {spec.name} in {seconds:.0f} s", flush=True)

    def _stop_all(self) -> None:
        """Ctrl-C: stop every run this runner started (each is its own process group)."""
        self._stopping = True
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
