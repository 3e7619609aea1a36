"""Which checkpoint a run resumes from: `latest`, the lineage in `history.json`, and `checkpoint.resume`.

- `<root>/latest` names the checkpoint `resume: auto` takes. Only when it is missing or names something
  incomplete does auto fall back to the newest complete checkpoint of the lineage, and it says so.
- Lineage, not step numbers. `<root>/history.json` lists the checkpoints of the current line of training
  in save order. A run that resumes from (or rolls back to) an older checkpoint starts a new line there
  (checkpointer.py moves the checkpoints of the abandoned future to `<root>/abandoned/`).
None of this needs a process group: the config check uses it before any exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fpa_megatron.checkpoint.format import HISTORY, LATEST, TAG_PREFIX, is_complete, write_atomic
from fpa_megatron.checkpoint.integrity import MARKER
from fpa_megatron.config import ConfigError, RunConfig, run_dir


def checkpoint_root(cfg: RunConfig) -> Path:
    """Where a run's checkpoints live: checkpoint.dir, else <logging.dir>/<run name>/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories directly under root, lowest step first (abandoned/ is not scanned)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(TAG_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX):]))


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


def write_history(root: Path, history: dict) -> None:
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
