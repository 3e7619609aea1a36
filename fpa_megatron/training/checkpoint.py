"""Checkpoints through DeepSpeed: model shards per TP x PP rank, ZeRO partitions per DP rank, plus our state.

Layout of `<root>/iter_0000040/`: DeepSpeed's files (mp_rank_XX_model_states.pt, one per model-parallel
rank; *_optim_states.pt, one per rank), `rng_rank_<r>.pt` per global rank (every rank's RNG streams
differ), `trainer_state.pt` (iteration, consumed samples, lambda schedule), `layout.json` (world size,
TP, PP, DP, ZeRO stage, virtual pipeline size), `config.yaml`, and the marker `complete`.

What makes a checkpoint trustworthy:
- Durable before it counts. Every rank fsyncs the files it wrote, then a barrier; rank 0 fsyncs the
  directory (and every file in it) and only then writes `complete`.
- Verified before it is used. `complete` records every file's size and checksum (computed by the rank that
  wrote it, `integrity.py`). On resume every rank verifies the files it reads and the ranks agree; a damaged
  checkpoint (a file missing, cut, or with changed bytes) is moved to `abandoned/` with the reason, and
  `resume: auto` takes the newest intact one of the lineage (`latest` follows); an explicit `resume: DIR`
  that fails is an error naming the file. A marker without checksums (older checkpoints) loads, with a log
  line. `complete`, `latest` and `history.json` are each written atomically (temp file, fsync, rename, fsync
  of the directory).
- `<root>/latest` names the checkpoint `resume: auto` takes. Only when it is missing or names something
  incomplete does auto fall back to the newest complete checkpoint of the lineage, and it says so.
- Lineage, not step numbers. `<root>/history.json` lists the checkpoints of the current line of training
  in save order. A run that resumes from (or rolls back to) an older checkpoint starts a new line there:
  the checkpoints saved after it belong to an abandoned future and are moved to `<root>/abandoned/`
  (kept, never resumed by auto, never silently deleted; the log says so). Pruning keeps the last
  `keep_last` checkpoints of the lineage, and never the one this run resumed from or the newest.
- Our own files hold only tensors, numbers, strings, lists and dicts, and are read with
  `torch.load(weights_only=True)`: no pickled code runs on resume. DeepSpeed's files too: its engine loads
  through `SafeCheckpointEngine` (weights_only=True, allowing only the DeepSpeed classes it pickles).
- The layout is recorded; resuming under another world size, TP or PP is refused before any weight is
  read, with both layouts named and the `fpa-reshard` command that converts the checkpoint. Under
  `parallel.elastic` a change of the data-parallel size alone is rewritten on the fly (elastic.py).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from fpa_megatron.config import ConfigError, RunConfig, run_dir, save_config
from fpa_megatron.logging.run_log import get_logger
from fpa_megatron.training.checkpoint_layout import (LAYOUT, CheckpointLayout, CheckpointLayoutError,  # noqa: F401
                                                     check_layout, read_layout)
from fpa_megatron.training import elastic
from fpa_megatron.training.integrity import (MARKER, CheckpointIntegrityError, agree_on_problem,
                                             checkpoint_problem, describe_files, has_checksums, marker_text)

LATEST = "latest"
HISTORY = "history.json"
TRAINER_STATE = "trainer_state.pt"
ABANDONED = "abandoned"
TAG_PREFIX = "iter_"
log = get_logger("checkpoint")
RESHARDED = "resharded.json"  # written by fpa-reshard in place of the per-rank RNG states


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def checkpoint_root(cfg: RunConfig) -> Path:
    """Where a run's checkpoints live: checkpoint.dir, else <logging.dir>/<run name>/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories directly under root, lowest step first (abandoned/ is not scanned)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(TAG_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX):]))


# ------------------------------------------------------------------------------------------ durable files


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names created in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader (or a crash) sees the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def mark_complete(path: Path, step: int, checksums: Optional[dict] = None) -> None:
    """Make checkpoint directory `path` durable (its files, itself, its name in the root), then write its
    marker with every file's size and checksum: a checkpoint counts only once everything in it would survive
    a crash. `checksums`: what the ranks computed for their own files; the rest are computed here."""
    files = [f for f in path.iterdir() if f.is_file() and f.name != MARKER and not f.name.startswith(".")]
    for file in files:
        fsync_path(file)
    fsync_path(path)
    fsync_path(path.parent)  # the directory entry of iter_... itself
    recorded = dict(checksums or {})
    recorded.update(describe_files(f for f in files if f.name not in recorded))
    write_atomic(path / MARKER, marker_text(step, recorded))


def save_durable(obj: Any, path: Path) -> None:
    """torch.save and fsync (the caller makes the directory entry durable)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its files (what torch.load(weights_only=True) refused in a saved
    checkpoint): the ZeRO files' loss scaler, ZeRO stage and parameter fragment addresses. Nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """One of DeepSpeed's checkpoint files, read with weights_only=True plus DeepSpeed's own classes: a file
    holding any other object (e.g. one whose unpickling would run code) is refused with its name."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError for refused objects
        raise CheckpointIntegrityError(
            f"checkpoint file {path} is not loadable with torch.load(weights_only=True) and DeepSpeed's own "
            f"classes (it holds other objects, or is damaged); refusing it: {err}") from None


@functools.cache
def _safe_checkpoint_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with weights_only=True and DeepSpeed's own classes."""

        def load(self, path: str, map_location=None):
            return load_deepspeed_file(path, map_location=map_location)

    return SafeCheckpointEngine


def load_safely(engine) -> None:
    """DeepSpeed 0.19's torch checkpoint engine loads with weights_only=False; every file `engine.load_checkpoint`
    reads goes through `engine.checkpoint_engine.load`, so the engine gets one that does not."""
    safe = _safe_checkpoint_engine_class()
    if not isinstance(engine.checkpoint_engine, safe):
        engine.checkpoint_engine = safe(engine._config)


def load_trusted(path: Path) -> Any:
    """Read one of our own files with weights_only=True: tensors, numbers, strings, lists, dicts; nothing
    that could run code. A file holding anything else is refused with its name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError for refused objects
        raise RuntimeError(f"checkpoint file {path} is not loadable with torch.load(weights_only=True) (it holds "
                           f"more than tensors, numbers, strings, lists and dicts); refusing it: {err}") from None


# ------------------------------------------------------------------------------------------ layout


def write_layout(path: Path, layout: CheckpointLayout, step: int) -> None:
    """Record the layout next to the shards (layout.json), so a resume can check it before reading weights."""
    write_atomic(path / LAYOUT, json.dumps(dict(asdict(layout), step=step)) + "\n")



# ------------------------------------------------------------------------------------------ lineage


def read_history(root: Path) -> dict:
    """{'lineage': [tags in save order], 'abandoned': [...]}; without history.json (older runs) the
    lineage is the complete checkpoints in step order."""
    path = root / HISTORY
    try:
        history = json.loads(path.read_text())
        history["lineage"] = [str(tag) for tag in history["lineage"]]
        history.setdefault("abandoned", [])
        return history
    except (OSError, ValueError, KeyError, TypeError):  # missing (or not ours): rebuilt from the directories
        return {"lineage": [p.name for p in complete_checkpoints(root)], "abandoned": []}


def _write_history(root: Path, history: dict) -> None:
    write_atomic(root / HISTORY, json.dumps(history, indent=2) + "\n")


def resolve_latest(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """The checkpoint `resume: auto` takes, and a note when `latest` could not be trusted.

    `latest` decides. Only when it is missing or names an incomplete directory: the newest complete
    checkpoint of the lineage (history.json), else the highest complete step under root.
    """
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named and is_complete(root / named):
        return root / named, None
    lineage = [root / tag for tag in read_history(root)["lineage"] if is_complete(root / tag)]
    fallback = lineage[-1] if lineage else None
    if fallback is None:
        return None, (f"{pointer} names {named!r}, which is not a complete checkpoint, and no complete "
                      f"checkpoint is left" if named else None)
    why = f"names {named!r}, which is not a complete checkpoint" if named else "is missing"
    return fallback, f"{pointer} {why}: taking the newest complete checkpoint of the lineage, {fallback.name}"


def resolve_resume(root: Path, resume: str) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint to resume from or None, note) for checkpoint.resume = auto | none | <directory>.

    <directory> is one checkpoint, or a checkpoint root (then its `latest`, as for auto). Raises
    ConfigError when it is neither. Needs no process group.
    """
    if resume == "none":
        return None, None
    if resume == "auto":
        return resolve_latest(root)
    path = Path(resume)
    if is_complete(path):
        return path, None
    if path.is_dir() and ((path / LATEST).is_file() or complete_checkpoints(path)):
        found, note = resolve_latest(path)  # a checkpoint root (e.g. what fpa-reshard wrote): its `latest`
        if found is not None:
            return found, note
    why = (f"it has no '{MARKER}' marker (not a checkpoint, or its save did not finish) and holds no complete "
           f"checkpoint" if path.is_dir() else "no such directory")
    raise ConfigError(f"checkpoint.resume={resume!r} is not a complete checkpoint directory: {why}")


# ------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _deepspeed_files(engine, root: Path, tag: str) -> list[Path]:
    """The files DeepSpeed's save_checkpoint wrote on this rank (its own naming: the model states on one
    rank per model-parallel rank, a ZeRO optimizer partition on every rank)."""
    files = []
    if engine.save_non_zero_checkpoint:
        files.append(Path(engine._get_ckpt_name(str(root), tag)))
    if engine.save_zero_checkpoint:
        files.append(Path(engine._get_zero_ckpt_name(str(root), tag)))
    return files


# ------------------------------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Saves every `interval` steps, every `interval_minutes` and at the end; resumes from `latest` (the newest
    intact checkpoint); keeps a lineage (see module doc).

    All ranks call `maybe_save`, `save`, `find_resume` and `load` together; `latest` needs no process group.
    Rank 0 alone writes the marker, `latest`, `history.json`, and moves or prunes directories.
    """

    clock = staticmethod(time.monotonic)  # the wall clock of interval_minutes (tests freeze it on one rank)

    def __init__(self, root: str | Path, interval: int, keep_last: int, resume: str, cfg: RunConfig,
                 interval_minutes: float = 0.0):
        self.root = Path(root)
        self.interval, self.keep_last, self.resume_mode, self.cfg = interval, keep_last, resume, cfg
        self.interval_minutes = interval_minutes
        self.last_save_time = self.clock()  # the wall-clock interval counts from the start, then from each save
        self.resumed_from: Optional[Path] = None  # the checkpoint this run last loaded (resume or rollback)
        self._protected: set[Path] = set()  # every checkpoint this run loaded: never pruned
        self._verified: Optional[Path] = None  # the checkpoint find_resume verified on every rank
        self._lineage_started = False

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
        due = ((self.interval > 0 and step % self.interval == 0) or (final and self.cfg.checkpoint.save_at_end)
               or exiting or time_due)
        return self.save(step, engine, trainer_state) if due else None

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """Write the checkpoint of `step` on every rank; it counts (marker, latest) once all is durable.

        trainer_state must hold only tensors, numbers, strings, lists and dicts (it is read back with
        weights_only=True).
        """
        tag = checkpoint_tag(step)
        path = self.root / tag
        rank = dist.get_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self._lineage_started:
                self._start_lineage(self.resumed_from)
            if path.exists():  # what a killed save left behind, or a complete one in the way
                self._clear_way(path)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        mine = _deepspeed_files(engine, self.root, tag)
        save_durable(rng_state(), path / f"rng_rank_{rank}.pt")
        mine.append(path / f"rng_rank_{rank}.pt")
        if rank == 0:
            save_durable(trainer_state, path / TRAINER_STATE)
            layout = CheckpointLayout.of_run(self.cfg, dist.get_world_size())
            write_layout(path, layout, step)
            save_config(self.cfg, path / "config.yaml")
            mine += [path / TRAINER_STATE, path / "config.yaml"]
        for file in mine:  # each rank makes its own files durable (on a shared file system only it can)
            fsync_path(file)
        checksums = describe_files(mine)  # read back by the rank that wrote them, while they are cached
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, checksums)  # doubles as the barrier: every rank's files are durable
        if rank == 0:
            self._commit(path, {name: v for per_rank in gathered for name, v in per_rank.items()})
        dist.barrier()
        self.last_save_time = self.clock()
        return path

    def _commit(self, path: Path, checksums: dict) -> None:
        """Rank 0, after every rank's files are durable: directory, marker, history, latest, then prune."""
        mark_complete(path, int(path.name[len(TAG_PREFIX):]), checksums)  # and whatever else was written in it
        history = read_history(self.root)
        history["lineage"] = [t for t in history["lineage"] if t != path.name] + [path.name]
        _write_history(self.root, history)
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
            _write_history(self.root, history)

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
        _write_history(self.root, history)
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
            _write_history(self.root, history)
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
        _write_history(self.root, history)
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

        For a rollback: `checkpointer.load(checkpointer.latest(), engine)`. Needs no process group.
        """
        return resolve_latest(self.root)[0]

    def load(self, path: Path, engine) -> dict:
        """Restore model, optimizer (ZeRO partitions), RNG streams; return the trainer state.

        Refuses (CheckpointLayoutError) a checkpoint of another world size, TP or PP before reading any
        weight. Afterwards this run's lineage continues from path: newer checkpoints are abandoned (moved
        aside at once, so that `resume: auto` can never go back to them) and path is never pruned.
        """
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
