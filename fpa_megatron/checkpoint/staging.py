"""How a checkpoint's files get written: staged at the step, then written (in the background under
checkpoint.async_save), and counted only once every rank's files are durable.

- Staging (`HostStaging.copy`): what a save writes, copied to host memory: every tensor storage into a host
  buffer (pinned when CUDA is present), tensors rebuilt as views of it, the rest deep-copied. torch.save writes
  one record per storage, so keeping the storages' sharing keeps the file byte-identical to a save of the live
  state. The buffers are reused from save to save (one save is in flight at most): the host memory is one
  checkpoint shard per rank, the planner's `checkpoint_staging` term.
- DeepSpeed's files: `deepspeed_writes(engine, copy)` swaps the engine's checkpoint engine for one that hands
  back (state, path) instead of writing, so DeepSpeed decides what goes into its files and we decide when.
- The writer (`SaveJob.run`): every rank writes and fsyncs its files, checksums them (integrity.py), then
  writes `.durable_rank_R` holding the checksums; rank 0 waits for every rank's such file (a `.failed_rank_R`
  fails it, naming that rank's file), then commits: `complete` (format.mark_complete), history, `latest`.
  No collective: the files in the checkpoint directory are the agreement, so the job can run on a thread.
  A thread suffices: torch.save's storage writes, the file writes and fsync release the GIL.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fpa_megatron import faults
from fpa_megatron.checkpoint.format import fsync_path, write_atomic
from fpa_megatron.checkpoint.integrity import describe_files

DURABLE = ".durable_rank_{}"  # a rank's files are durable; holds their checksums
FAILED = ".failed_rank_{}"  # a rank could not write a file; holds the error naming it
POLL_S = 0.05


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written; the message names the rank and the file."""


# ------------------------------------------------------------------------------------------ staging


class HostStaging:
    """Host copies of what a save writes, in buffers reused from one save to the next."""

    def __init__(self):
        self._buffers: list[torch.UntypedStorage] = []  # in the order the storages are met: the same every save
        self._used = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self._buffers)

    def rewind(self) -> None:
        """A new save begins (the previous one is written): its buffers are free for reuse."""
        self._used = 0

    def copy(self, obj: Any) -> Any:
        """obj with every tensor's storage copied into a host buffer of its own in this save (storage sharing
        kept), dicts and lists rebuilt, everything else deep-copied: later changes to the live state do not
        reach it."""
        return self._copy(obj, {})

    def _copy(self, obj: Any, memo: dict) -> Any:
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.__dict__:
            new = self._tensor(obj, memo)
        elif type(obj) is tuple:
            new = tuple(self._copy(item, memo) for item in obj)
        elif type(obj) in (dict, list) or (isinstance(obj, dict) and type(obj).__module__ == "collections"):
            new = type(obj)()  # (OrderedDict too) memoized before its items: pickle's sharing of it is kept
            memo[id(obj)] = new
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for key, value in items:
                if isinstance(new, dict):
                    new[key] = self._copy(value, memo)
                else:
                    new.append(self._copy(value, memo))
            if hasattr(obj, "__dict__"):  # e.g. a module state dict's _metadata
                new.__dict__.update(copy.deepcopy(obj.__dict__, memo))
            return new
        else:
            new = copy.deepcopy(obj, memo)
        memo[id(obj)] = new
        return new

    def _tensor(self, tensor: torch.Tensor, memo: dict) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = ("storage", storage.device, storage.data_ptr())
        if key not in memo:
            memo[key] = self._buffer(storage)
        host = torch.empty(0, dtype=tensor.dtype).set_(memo[key], tensor.storage_offset(), tensor.size(),
                                                          tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(host, requires_grad=tensor.requires_grad)
        return host.requires_grad_(tensor.requires_grad)

    def _buffer(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        if self._used == len(self._buffers) or self._buffers[self._used].nbytes() != storage.nbytes():
            buffer = torch.UntypedStorage(storage.nbytes())
            if torch.cuda.is_available():
                buffer = buffer.pin_memory()  # device-to-host copies at full speed
            self._buffers[self._used:self._used + 1] = [buffer]
        buffer = self._buffers[self._used]
        self._used += 1
        buffer.copy_(storage)
        return buffer



# ------------------------------------------------------------------------------------------ DeepSpeed's files


@functools.cache
def _recording_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class RecordingCheckpointEngine(CheckpointEngine):
        """Keeps (staged state, path, torch.save options) of every file DeepSpeed's save_checkpoint would write."""

        def __init__(self, stage: Callable[[Any], Any], zipfile_serialization: bool):
            super().__init__()
            self.stage, self.zipfile_serialization, self.files = stage, zipfile_serialization, []

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            options = {"_use_new_zipfile_serialization": self.zipfile_serialization}
            self.files.append((self.stage(state_dict), Path(path), options))

        def load(self, path: str, map_location=None):
            raise RuntimeError("the recording checkpoint engine only saves")

        def commit(self, info) -> bool:
            return True

    return RecordingCheckpointEngine


@contextmanager
def deepspeed_writes(engine, stage: Callable[[Any], Any]):
    """While inside, engine.save_checkpoint writes no file: it yields the list of (stage(state), path,
    torch.save options) of the files it would have written (DeepSpeed still makes the directories)."""
    previous = engine.checkpoint_engine
    recorder = _recording_engine_class()(stage, getattr(previous, "zipfile_serialization", True))
    engine.checkpoint_engine = recorder
    try:
        yield recorder.files
    finally:
        engine.checkpoint_engine = previous


def torch_file(obj: Any, options: Optional[dict] = None) -> Callable[[Path], None]:
    """A writer of one torch file (SaveJob fsyncs it)."""
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            torch.save(obj, f, **(options or {}))
    return write


# ------------------------------------------------------------------------------------------ the writer


@dataclass
class SaveJob:
    """One rank's part of the save of `step` into `path`: its files (path, writer) and, on rank 0, the commit
    (called with every rank's checksums once all files are durable)."""

    path: Path
    step: int
    rank: int
    world_size: int
    files: list[tuple[Path, Callable[[Path], None]]]
    commit: Optional[Callable[[dict], None]] = None
    timeout_s: float = 600.0
    abandoned: threading.Event = field(default_factory=threading.Event)  # the run failed: stop waiting for ranks

    def run(self) -> None:
        written: list[Path] = []
        file = self.path
        try:
            for index, (file, write) in enumerate(self.files):
                faults.checkpoint_write(self.step, file, index)  # FPA_FAULT save drills; nothing unless set
                write(file)
                fsync_path(file)  # each rank makes its own files durable (on a shared file system only it can)
                written.append(file)
            checksums = describe_files(written)  # read back while they are cached
        except Exception as err:  # noqa: BLE001 - any failure fails the save, naming the file
            message = f"rank {self.rank}: writing checkpoint file {file} failed: {type(err).__name__}: {err}"
            try:
                write_atomic(self.path / FAILED.format(self.rank), message + "\n")
            except OSError:
                pass  # rank 0 then waits until timeout_s; this rank's own error stops the run first
            raise CheckpointWriteError(message) from err
        write_atomic(self.path / DURABLE.format(self.rank), json.dumps(checksums) + "\n")
        if self.commit is not None:
            self.commit(self._every_rank_durable())

    def _every_rank_durable(self) -> dict:
        """Rank 0: every rank's checksums, once each has reported its files durable (files, not a collective)."""
        deadline = time.monotonic() + self.timeout_s
        pending, checksums = set(range(self.world_size)), {}
        while pending:
            for rank in sorted(pending):
                failed = self.path / FAILED.format(rank)
                if failed.is_file():
                    raise CheckpointWriteError(failed.read_text().strip())
                durable = self.path / DURABLE.format(rank)
                if durable.is_file():
                    checksums.update(json.loads(durable.read_text()))
                    pending.discard(rank)
            if pending and self.abandoned.is_set():
                raise CheckpointWriteError(f"checkpoint {self.path} abandoned: the run failed before rank(s) "
                                           f"{sorted(pending)} reported their files durable (it never counts)")
            if pending and time.monotonic() > deadline:
                raise CheckpointWriteError(f"checkpoint {self.path}: rank(s) {sorted(pending)} did not report their "
                                           f"files durable within {self.timeout_s:g} s (parallel.timeout_minutes)")
            if pending:
                time.sleep(POLL_S)
        for rank in range(self.world_size):
            (self.path / DURABLE.format(rank)).unlink()
        return checksums


@dataclass
class BackgroundWrite:
    """A SaveJob running on its own thread; `join` waits for it and raises its failure."""

    job: SaveJob
    error: Optional[BaseException] = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self):
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-writer-{self.job.path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.job.run()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by join
            self.error = err

    @property
    def busy(self) -> bool:
        return self.thread.is_alive()

    @property
    def failed(self) -> bool:
        return not self.busy and self.error is not None

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
