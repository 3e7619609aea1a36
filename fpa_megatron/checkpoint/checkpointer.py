"""The Checkpointer: saves through DeepSpeed (model shards per TP x PP rank, ZeRO partitions per DP rank) plus
our state, on its own cadence, and finds and loads the checkpoint to resume from.

What makes a checkpoint trustworthy (files: format.py; which one to resume: lineage.py):
- Durable before it counts. Every rank fsyncs the files it wrote and says so in the checkpoint directory;
  rank 0, once every rank has, fsyncs the directory (and every file in it) and only then writes `complete`,
  then moves `latest` (staging.py). Under checkpoint.async_save (the default) the state is staged to host
  memory at the step and all of this happens in the background while training goes on; one save is in flight
  at most, and the end of the run (and every stop) waits for it.
- Verified before it is used. `complete` records every file's size and checksum (computed by the rank that
  wrote it, `integrity.py`). On resume every rank verifies the files it reads and the ranks agree; a damaged
  checkpoint (a file missing, cut, or with changed bytes) is moved to `abandoned/` with the reason, and
  `resume: auto` takes the newest intact one of the lineage (`latest` follows); an explicit `resume: DIR`
  that fails is an error naming the file. A marker without checksums (older checkpoints) loads, with a log
  line.
- A run that resumes from (or rolls back to) an older checkpoint starts a new line there: the checkpoints
  saved after it belong to an abandoned future and are moved to `<root>/abandoned/` (kept, never resumed by
  auto, never silently deleted; the log says so). Pruning keeps the last `keep_last` checkpoints of the
  lineage, and never the one this run resumed from or the newest.
- The layout is recorded; resuming under another world size, TP or PP is refused before any weight is
  read, with both layouts named and the `fpa-reshard` command that converts the checkpoint. Under
  `parallel.elastic` a change of the data-parallel size alone is rewritten on the fly (elastic.py).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from fpa_megatron.checkpoint import elastic
from fpa_megatron.checkpoint.format import (ABANDONED, LATEST, RESHARDED, TAG_PREFIX, TRAINER_STATE, checkpoint_tag,
                                            fsync_path, is_complete, load_safely, load_trusted, mark_complete,
                                            write_atomic, write_layout)
from fpa_megatron.checkpoint.integrity import (MARKER, CheckpointIntegrityError, agree_on_problem, checkpoint_problem,
                                               has_checksums)
from fpa_megatron.checkpoint.layout import LAYOUT, CheckpointLayout, check_layout, read_layout
from fpa_megatron.checkpoint.lineage import (checkpoint_root, complete_checkpoints, read_history, resolve_latest, resolve_resume,
                                             write_history)
from fpa_megatron.checkpoint.staging import BackgroundWrite, HostStaging, SaveJob, deepspeed_writes, torch_file
from fpa_megatron.config import RunConfig, save_config
from fpa_megatron.exit_codes import RunStopped
from fpa_megatron.run_log import get_logger

log = get_logger("checkpoint")


# ------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Saves every `interval` steps, every `interval_minutes` and at the end; resumes from `latest` (the newest
    intact checkpoint); keeps a lineage (see module doc).

    All ranks call `maybe_save`, `save`, `find_resume` and `load` together; `latest` needs no process group.
    Rank 0 alone writes the marker, `latest`, `history.json`, and moves or prunes directories.
    """

    clock = staticmethod(time.monotonic)  # the wall clock of interval_minutes (tests freeze it on one rank)

    def __init__(self, cfg: RunConfig, root: Optional[str | Path] = None):
        """The run's checkpointer: its `checkpoint` section (interval, interval_minutes, keep_last, resume);
        `root` defaults to the run's checkpoint root (checkpoint.dir, else <run dir>/checkpoints)."""
        self.root = Path(root) if root is not None else checkpoint_root(cfg)
        ck = cfg.checkpoint
        self.interval, self.keep_last, self.resume_mode, self.cfg = ck.interval, ck.keep_last, str(ck.resume), cfg
        self.interval_minutes = ck.interval_minutes
        self.last_save_time = self.clock()  # the wall-clock interval counts from the start, then from each save
        self.resumed_from: Optional[Path] = None  # the checkpoint this run last loaded (resume or rollback)
        self._protected: set[Path] = set()  # every checkpoint this run loaded: never pruned
        self._verified: Optional[Path] = None  # the checkpoint find_resume verified on every rank
        self._lineage_started = False
        self.async_save = ck.async_save
        self._staging = HostStaging()  # one checkpoint shard per rank, reused by every save
        self._in_flight: Optional[BackgroundWrite] = None

    # -- saving

    def time_due(self) -> bool:
        """This rank's clock says checkpoint.interval_minutes passed since the last save. Only rank 0's counts:
        the trainer passes it through the guard's all-reduce, so that every rank saves at the same step."""
        return (self.interval_minutes > 0 and (not dist.is_initialized() or dist.get_rank() == 0)
                and self.clock() - self.last_save_time >= 60.0 * self.interval_minutes)

    def maybe_save(self, step: int, engine, trainer_state: dict, *, final: bool = False,
                   exiting: bool = False, time_due: bool = False) -> Optional[Path]:
        """`step` = optimizer steps done. Saves on the interval, when `time_due` (every rank's agreed
        `time_due()`), at the end (checkpoint.save_at_end), and always before an early exit
        (train.exit_interval), so that a rerun resumes where this one stopped."""
        if self._in_flight is not None and self._in_flight.failed:
            self.wait()  # a failed background write fails the run at the next step, naming the file
        due = ((self.interval > 0 and step % self.interval == 0) or (final and self.cfg.checkpoint.save_at_end)
               or exiting or time_due)
        return self.save(step, engine, trainer_state) if due else None

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """Write the checkpoint of `step` on every rank; it counts (marker, latest) once all is durable.

        Under checkpoint.async_save the state is staged to host memory here and written in the background
        (see `wait`); otherwise every rank returns once the checkpoint is complete.
        trainer_state must hold only tensors, numbers, strings, lists and dicts (it is read back with
        weights_only=True).
        """
        with torch.profiler.record_function("fpa/checkpoint_save"):
            return self._save(step, engine, trainer_state)

    def _save(self, step: int, engine, trainer_state: dict) -> Path:
        tag = checkpoint_tag(step)
        path = self.root / tag
        rank = dist.get_rank()
        self.wait(next_tag=tag)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self._lineage_started:
                self._start_lineage(self.resumed_from)
            if path.exists():  # what a killed save left behind, or a complete one in the way
                self._clear_way(path)
        dist.barrier()
        self._staging.rewind()  # nothing in flight: the buffers of the last save are free
        stage = self._staging.copy if self.async_save else (lambda state: state)  # sync: written before it changes
        with deepspeed_writes(engine, stage) as deepspeed_files:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        files = [(file, torch_file(state, options)) for state, file, options in deepspeed_files]
        ours = {f"rng_rank_{rank}.pt": rng_state()}
        if rank == 0:
            ours[TRAINER_STATE] = trainer_state
        files += [(path / name, torch_file(state)) for name, state in stage(ours).items()]
        if rank == 0:
            layout = CheckpointLayout.of_run(self.cfg, dist.get_world_size())
            files += [(path / LAYOUT, lambda file: write_layout(file.parent, layout, step)),
                      (path / "config.yaml", lambda file: save_config(self.cfg, file))]
        commit = (lambda checksums: self._commit(path, checksums)) if rank == 0 else None
        job = SaveJob(path, step, rank, dist.get_world_size(), files, commit,
                      timeout_s=60.0 * self.cfg.parallel.timeout_minutes)
        self.last_save_time = self.clock()
        if self.async_save:
            self._in_flight = BackgroundWrite(job)
        else:
            job.run()
            dist.barrier()  # every rank returns once the checkpoint counts
        return path

    def wait(self, next_tag: Optional[str] = None) -> None:
        """Block until this rank's save in flight is written (rank 0: and committed, `latest` moved); raise its
        failure (CheckpointWriteError naming the rank and file). One save is in flight at most: the save of
        `next_tag` waits here, and says so if it had to."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        busy, started = in_flight.busy, time.perf_counter()
        in_flight.join()
        if busy and next_tag:
            log.warning(f"checkpoint {next_tag} waited {time.perf_counter() - started:.1f} s for "
                        f"{in_flight.job.path.name}, still being written (one save in flight at most; a longer "
                        f"checkpoint.interval avoids the wait)")

    def _settle(self) -> None:
        """Before reading the root (a rollback): every rank waits for the save in flight, then all agree."""
        if self._in_flight is not None:
            self.wait()
            dist.barrier()  # rank 0's commit is done: every rank sees the same `latest`

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """The end of training, the exit interval and a stop (RunStopped: every rank agreed, all alive) wait for
        the save in flight. A failure abandons it: rank 0 stops waiting for ranks that may be dead (the
        checkpoint never counts; a rerun resumes from the one before), and the failure stays the error."""
        if exc is not None and not isinstance(exc, RunStopped) and self._in_flight is not None:
            self._in_flight.job.abandoned.set()
            log.warning(f"checkpoint {self._in_flight.job.path.name} was still being written: abandoned")
            self._in_flight = None
            return
        self.wait()

    def _commit(self, path: Path, checksums: dict) -> None:
        """Rank 0, after every rank's files are durable: directory, marker, history, latest, then prune."""
        mark_complete(path, int(path.name[len(TAG_PREFIX):]), checksums)  # and whatever else was written in it
        history = read_history(self.root)
        history["lineage"] = [t for t in history["lineage"] if t != path.name] + [path.name]
        write_history(self.root, history)
        write_atomic(self.root / LATEST, path.name + "\n")
        self._prune(history)

    def _prune(self, history: dict) -> None:
        """Remove lineage checkpoints older than the last keep_last, except what this run loaded."""
        lineage = history["lineage"]
        old = lineage[: -self.keep_last]
        removed = [t for t in old if (self.root / t).resolve() not in self._protected]
        for tag in removed:
            doomed = self.root / tag
            if (doomed / MARKER).exists():  # incomplete first: a kill mid-delete leaves no "complete" shell
                (doomed / MARKER).unlink()
                fsync_path(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if removed:
            history["lineage"] = [t for t in lineage if t not in removed]
            write_history(self.root, history)

    def _start_lineage(self, resumed_from: Optional[Path]) -> None:
        """Rank 0: this run continues the lineage up to resumed_from; what was saved after it (or, for a
        fresh start or a checkpoint from elsewhere, everything under root) is moved to abandoned/."""
        self._lineage_started = True
        self.root.mkdir(parents=True, exist_ok=True)  # a run resuming from a checkpoint elsewhere may have none yet
        history = read_history(self.root)
        lineage = history["lineage"]
        kept: list[str] = []
        if resumed_from is not None and resumed_from.resolve().parent == self.root.resolve():
            if resumed_from.name in lineage:
                kept = lineage[: lineage.index(resumed_from.name) + 1]
            else:
                kept = [resumed_from.name]
        kept = [t for t in kept if is_complete(self.root / t)]
        cause = f"this run resumed from {resumed_from}" if resumed_from is not None else "this run started afresh"
        for path in complete_checkpoints(self.root):
            if path.name not in kept:
                self._abandon(path, history, cause)
        history["lineage"] = kept
        write_history(self.root, history)
        pointer = self.root / LATEST
        if kept and (not pointer.is_file() or pointer.read_text().strip() != kept[-1]):
            write_atomic(pointer, kept[-1] + "\n")
        elif not kept and pointer.exists():
            pointer.unlink()
            fsync_path(self.root)

    def _clear_way(self, path: Path) -> None:
        """Rank 0: a complete checkpoint in the way of a new save is moved to abandoned/, a partial one removed."""
        if is_complete(path):
            history = read_history(self.root)
            self._abandon(path, history, f"a new checkpoint of step {path.name} replaces it")
            history["lineage"] = [t for t in history["lineage"] if t != path.name]
            write_history(self.root, history)
        else:
            shutil.rmtree(path)

    def _abandon(self, path: Path, history: dict, cause: str, damaged: bool = False) -> None:
        target = self.root / ABANDONED / path.name
        n = 1
        while target.exists():
            target, n = self.root / ABANDONED / f"{path.name}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        fsync_path(target.parent)
        fsync_path(self.root)
        history["abandoned"].append({"tag": path.name, "moved_to": str(target.relative_to(self.root)),
                                     "because": cause})
        what = "is damaged" if damaged else "is not on this run's lineage"
        log.warning(f"checkpoint {path.name} {what} ({cause}): moved to {target}; resume: auto will not use it. "
                    f"Delete it when it is no longer needed.")

    # -- resuming

    def find_resume(self, engine) -> Optional[Path]:
        """The checkpoint to resume from per checkpoint.resume (auto: `latest`), verified on every rank, or None.

        auto: a damaged checkpoint is moved to abandoned/ (with the reason) and the newest intact one of the
        lineage is taken instead, as often as needed. An explicit directory that fails raises
        CheckpointIntegrityError naming the file and what is wrong.
        """
        rank = dist.get_rank()
        while True:
            path, note = resolve_resume(self.root, self.resume_mode)
            if note and rank == 0:
                log.warning(f"resume: {note}")
            if path is None:
                return None
            problem = self.verify(path, engine)
            if problem is None:
                return path
            if self.resume_mode != "auto":
                raise CheckpointIntegrityError(f"checkpoint.resume={self.resume_mode}: checkpoint {path} is "
                                               f"damaged: {problem}")
            if rank == 0:
                self._abandon_damaged(path, problem)
            dist.barrier()  # every rank looks again once rank 0 moved it

    def verify(self, path: Path, engine) -> Optional[str]:
        """Every rank checks the files it reads from checkpoint `path` against the sizes and checksums in its
        marker; one all-reduce decides for all. Returns the problem (naming the rank and file), or None."""
        names = [Path(engine._get_ckpt_name(str(path.parent), path.name)).name,
                 Path(engine._get_zero_ckpt_name(str(path.parent), path.name)).name, TRAINER_STATE]
        if not (path / RESHARDED).exists():
            names.append(f"rng_rank_{dist.get_rank()}.pt")
        if not self._layout_fits(path):  # this rank's files are not the ones it would read: rank 0 checks all
            names = None if dist.get_rank() == 0 else [TRAINER_STATE]  # (load then rewrites it or refuses)
        if has_checksums(path):
            if names is not None:  # (None: every recorded file, the layout among them)
                names.append(LAYOUT)
        elif dist.get_rank() == 0:
            log.warning(f"checkpoint {path} has no checksums (written before checksums were recorded): "
                        f"its files are only checked to exist")
        problem = agree_on_problem(checkpoint_problem(path, names))
        if problem is None:
            self._verified = path
        return problem

    def _abandon_damaged(self, path: Path, problem: str) -> None:
        """Rank 0: move a damaged checkpoint aside, drop it from the lineage, point `latest` at the newest
        intact one left (resolve_latest's fallback finds it)."""
        history = read_history(self.root)
        self._abandon(path, history, problem, damaged=True)
        history["lineage"] = [t for t in history["lineage"] if t != path.name]
        write_history(self.root, history)
        fallback = next((self.root / t for t in reversed(history["lineage"]) if is_complete(self.root / t)), None)
        if fallback is not None:
            write_atomic(self.root / LATEST, fallback.name + "\n")
            log.warning(f"resume: {LATEST} now names {fallback.name}, the newest intact checkpoint left")
        elif (self.root / LATEST).exists():
            (self.root / LATEST).unlink()
            fsync_path(self.root)

    def has_resume_candidate(self) -> bool:
        """Whether checkpoint.resume names a checkpoint to resume from (not yet verified). Needs no process group."""
        return resolve_resume(self.root, self.resume_mode)[0] is not None

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this run's lineage (what `latest` names), or None.

        For a rollback: `checkpointer.load(checkpointer.latest(), engine)`. Needs no process group unless a
        save is in flight (then every rank waits for it).
        """
        self._settle()
        return resolve_latest(self.root)[0]

    def load(self, path: Path, engine) -> dict:
        """Restore model, optimizer (ZeRO partitions), RNG streams; return the trainer state.

        Refuses (CheckpointLayoutError) a checkpoint of another world size, TP or PP before reading any
        weight. Afterwards this run's lineage continues from path: newer checkpoints are abandoned (moved
        aside at once, so that `resume: auto` can never go back to them) and path is never pruned.
        """
        self._settle()
        path = Path(path)
        if path != self._verified:  # e.g. a rollback's target; find_resume's is verified already
            problem = self.verify(path, engine)
            if problem:
                raise CheckpointIntegrityError(f"checkpoint {path} is damaged: {problem}")
        load_dir = self._loadable(path)  # path, or (parallel.elastic) its copy rewritten for this world size
        load_safely(engine)  # DeepSpeed's files through weights_only=True
        load_path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {load_dir}")
        rng_file = load_dir / f"rng_rank_{dist.get_rank()}.pt"
        if rng_file.exists() or not (load_dir / RESHARDED).exists():
            set_rng_state(load_trusted(rng_file))
        elif dist.get_rank() == 0:  # RNG streams do not map across layouts: keep those seeded from train.seed
            log.info(f"{load_dir} was resharded (fpa-reshard or parallel.elastic): RNG streams start from train.seed")
        state = load_trusted(load_dir / TRAINER_STATE)
        self.resumed_from = path
        self._protected.add(path.resolve())
        dist.barrier()  # every rank has read path before rank 0 reorganizes the root
        if dist.get_rank() == 0:
            self._start_lineage(path)
            elastic.remove_copy(load_dir, self.root)
        dist.barrier()
        return state

    def _layout_fits(self, path: Path) -> bool:
        """Whether this run's ranks can read checkpoint path's files as they are (an unreadable layout counts
        as fitting: the verification then names what is wrong with the files)."""
        try:
            return read_layout(path).shards_match(CheckpointLayout.of_run(self.cfg, dist.get_world_size()))
        except (OSError, ValueError, KeyError, TypeError):
            return True

    def _loadable(self, path: Path) -> Path:
        """The directory to load path from: path itself when its layout is this run's; under parallel.elastic
        a copy rewritten for this world size when only the data-parallel size differs; else
        CheckpointLayoutError naming both layouts (before any weight is read)."""
        run = CheckpointLayout.of_run(self.cfg, dist.get_world_size())
        saved = check_layout(path, run, elastic=self.cfg.parallel.elastic)
        return path if saved is None else elastic.rewrite_for_this_world(path, saved, run, self.root)
