"""The checkpoint's files: names, durable and atomic writes, the `complete` marker, and safe loading.

Layout of `<root>/iter_0000040/`: DeepSpeed's files (mp_rank_XX_model_states.pt, one per model-parallel
rank; *_optim_states.pt, one per rank), `rng_rank_<r>.pt` per global rank (every rank's RNG streams
differ), `trainer_state.pt` (iteration, consumed samples, lambda schedule), `layout.json` (world size,
TP, PP, DP, ZeRO stage, virtual pipeline size), `config.yaml`, and the marker `complete` (every file's size
and checksum, integrity.py). `complete`, `latest` and `history.json` are each written atomically (temp file,
fsync, rename, fsync of the directory).

Our own files hold only tensors, numbers, strings, lists and dicts, and are read with
`torch.load(weights_only=True)`: no pickled code runs on resume. DeepSpeed's files too: its engine loads
through `SafeCheckpointEngine` (weights_only=True, allowing only the DeepSpeed classes it pickles).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from fpa_megatron.checkpoint.integrity import MARKER, CheckpointIntegrityError, describe_files, marker_text
from fpa_megatron.checkpoint.layout import LAYOUT, CheckpointLayout

LATEST = "latest"
HISTORY = "history.json"
TRAINER_STATE = "trainer_state.pt"
ABANDONED = "abandoned"
TAG_PREFIX = "iter_"
RESHARDED = "resharded.json"  # written by fpa-reshard in place of the per-rank RNG states


def checkpoint_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


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


def weights_only(path: Path) -> bool:
    """Whether checkpoint directory `path` holds weights only (fpa-import's: no optimizer state to resume), as its
    resharded.json says."""
    note = Path(path) / RESHARDED
    return note.is_file() and bool(json.loads(note.read_text()).get("weights_only"))


def write_layout(path: Path, layout: CheckpointLayout, step: int) -> None:
    """Record the layout next to the shards (layout.json), so a resume can check it before reading weights."""
    write_atomic(path / LAYOUT, json.dumps(dict(asdict(layout), step=step)) + "\n")
