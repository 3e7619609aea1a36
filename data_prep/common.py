"""Small helpers shared by the fpa-prep steps: errors, atomic writes, hashing, output-dir checks."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

HASH_CHUNK = 8 << 20


class PrepError(Exception):
    """A user-facing error (bad input path, unreadable tokenizer, unwritable output...).

    The CLI prints the message and exits with status 2, before any work when possible.
    """


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON atomically (deterministic bytes for equal objects)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def ensure_writable_dir(path: str) -> str:
    """Create `path` if needed and prove it is writable; raise PrepError with a clear message if not."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise PrepError(f"cannot create output directory {path}: {err.strerror or err}") from None
    if not os.path.isdir(path):
        raise PrepError(f"output path {path} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PrepError(f"output directory {path} is not writable: {err.strerror or err}") from None
    return path


def ensure_writable_parent(prefix: str) -> str:
    """Like ensure_writable_dir for the directory that will hold `<prefix>.*` files."""
    ensure_writable_dir(os.path.dirname(os.path.abspath(prefix)) or ".")
    return os.path.abspath(prefix)


def fsync_close(f) -> None:
    """Flush, fsync and close a file object: data is on disk before a rename publishes it."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
