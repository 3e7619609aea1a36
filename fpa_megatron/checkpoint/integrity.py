"""Checkpoint integrity: every file's size and checksum recorded in the `complete` marker, verified on read.

torch.load does not notice bytes flipped inside a tensor record (it loads the values), so a damaged file would
resume silently. At commit, the marker becomes JSON: `{"step": 40, "checksum": "xxh3_128", "files": {name:
{"bytes": n, "xxh3_128": hex}}}` (xxh3: benchmarks/checkpoint_checksum.py measures it next to the write). A
marker holding only the step (checkpoints written before this) means: no checksums, the files are not verified.

`fpa-ckpt verify DIR` reports the state of one checkpoint or of every checkpoint under a root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

MARKER = "complete"
CHECKSUM = "xxh3_128"
CHUNK = 8 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or differs from its recorded checksum; the message names it."""


def file_checksum(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in 8 MiB chunks."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(paths: Iterable[Path]) -> dict[str, dict]:
    """{file name: {"bytes": size, CHECKSUM: hex}} of the given files (what the marker records)."""
    return {p.name: {"bytes": p.stat().st_size, CHECKSUM: file_checksum(p)} for p in paths}


def marker_text(step: int, files: dict[str, dict]) -> str:
    return json.dumps({"step": step, "checksum": CHECKSUM, "files": dict(sorted(files.items()))}, indent=1) + "\n"


@dataclass(frozen=True)
class Recorded:
    """What a checkpoint's marker says: its step and the files it recorded (None: an older marker, no checksums)."""

    step: Optional[int]
    files: Optional[dict[str, dict]]


def read_marker(path: Path) -> Recorded:
    """The marker of checkpoint directory `path` (raises OSError when there is none)."""
    text = (path / MARKER).read_text()
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if isinstance(values, dict) and isinstance(values.get("files"), dict):
        return Recorded(int(values["step"]), values["files"])
    try:
        return Recorded(int(text.strip()), None)  # the older marker: the step only
    except ValueError:
        return Recorded(None, None)


def file_problem(path: Path, recorded: Optional[dict]) -> Optional[str]:
    """What is wrong with one checkpoint file against its record (None: it is intact, or nothing was recorded
    and it exists)."""
    if not path.is_file():
        return f"{path} is missing"
    if recorded is None:
        return None
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return (f"{path} is {size} bytes but was {recorded['bytes']} bytes when saved "
                f"({'truncated' if size < recorded['bytes'] else 'grown'})")
    if file_checksum(path) != recorded[CHECKSUM]:
        return f"{path} does not match its checksum ({CHECKSUM}): its bytes changed after the save"
    return None


def checkpoint_problem(path: Path, names: Optional[Iterable[str]] = None) -> Optional[str]:
    """The first problem of checkpoint `path`: every recorded file must exist; the files `names` (default: all
    recorded ones) must also have their recorded size and checksum. Without checksums only `names` must exist."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"{path / MARKER} is missing (the save did not finish)"
    files = read_marker(path).files
    if files is not None:
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            return f"{path / missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    wanted = list(files) if names is None and files is not None else list(names or [])
    for name in wanted:
        if files is not None and name not in files and (path / name).is_file():
            return f"{path / name} is not listed in {path / MARKER} (added after the save?)"
        problem = file_problem(path / name, None if files is None else files.get(name))
        if problem:
            return problem
    return None


def one_file_problem(file: Path) -> Optional[str]:
    """file_problem of one file of a checkpoint against that checkpoint's marker (the other files not looked at)."""
    files = read_marker(file.parent).files
    if files is not None and file.name not in files and file.is_file():
        return f"{file} is not listed in {file.parent / MARKER} (added after the save?)"
    return file_problem(file, None if files is None else files.get(file.name))


def has_checksums(path: Path) -> bool:
    try:
        return read_marker(Path(path)).files is not None
    except OSError:
        return False


def agree_on_problem(problem: Optional[str]) -> Optional[str]:
    """Every rank's verdict combined: one all-reduce of a flag; only when some rank failed are the reasons
    gathered (so that every rank can name the file). Returns the first rank's problem, or None."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return problem
    flag = torch.tensor([float(problem is not None)], dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, problem)
    return next(f"rank {r}: {why}" for r, why in enumerate(reasons) if why)


# ------------------------------------------------------------------------------------------ fpa-ckpt


def checkpoint_state(path: Path) -> tuple[str, bool]:
    """(a line for users, intact?) for one checkpoint directory."""
    if not (path / MARKER).is_file():
        return "incomplete (no 'complete' marker: its save did not finish)", False
    problem = checkpoint_problem(path)
    if problem:
        return f"DAMAGED: {problem}", False
    recorded = read_marker(path)
    if recorded.files is None:
        return "no checksums (written before checksums were recorded): files present, contents not verifiable", True
    return f"intact ({len(recorded.files)} files match their {CHECKSUM} checksums)", True
