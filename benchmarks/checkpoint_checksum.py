"""What a checkpoint checksum costs next to the write it protects, measured side by side on one file.

    python benchmarks/checkpoint_checksum.py [--size-mb 1024] [--dir /tmp]

Writes one float32 tensor of --size-mb with torch.save and fsyncs it (what a checkpoint save does per file),
then reads it back through each candidate checksum (zlib.crc32, hashlib.blake2b, xxhash xxh3_64 / xxh3_128)
in the chunks `fpa_megatron.checkpoint.integrity` uses, right after the write (the pages still cached, as at
commit), and once more after dropping the file from the page cache where the OS allows it (as on resume).
Prints each time and its ratio to the write.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

import torch
import xxhash

CHUNK = 8 << 20


def _read_through(path: Path, update) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            update(chunk)
    return time.perf_counter() - start


def _crc32(path: Path) -> float:
    crc = [0]
    return _read_through(path, lambda chunk: crc.__setitem__(0, zlib.crc32(chunk, crc[0])))


HASHES = {
    "zlib.crc32": _crc32,
    "hashlib.blake2b": lambda p: _read_through(p, hashlib.blake2b().update),
    "xxhash.xxh3_64": lambda p: _read_through(p, xxhash.xxh3_64().update),
    "xxhash.xxh3_128": lambda p: _read_through(p, xxhash.xxh3_128().update),
}


def drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages (posix_fadvise); False where that is unavailable."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where to write the file (default: the temp directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model_states.pt"
        tensor = torch.randn(args.size_mb * (1 << 20) // 4)
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"module": {"weight": tensor}}, f)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        size_gb = path.stat().st_size / 1e9
        print(f"file {size_gb:.2f} GB; torch.save + fsync: {write_s:.2f} s ({size_gb / write_s:.2f} GB/s)")
        print(f"{'checksum':18s} {'cached s':>9s} {'GB/s':>6s} {'/ write':>8s} {'uncached s':>11s} {'/ write':>8s}")
        for name, run in HASHES.items():
            cached = run(path)
            cold = run(path) if drop_cache(path) else float("nan")
            print(f"{name:18s} {cached:9.2f} {size_gb / cached:6.2f} {cached / write_s:8.3f} {cold:11.2f} "
                  f"{cold / write_s:8.3f}")


if __name__ == "__main__":
    main()
