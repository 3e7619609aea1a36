"""`fpa-prep merge`: concatenate indexed datasets into one prefix at disk speed, without Megatron-core.

Either name the prefixes to merge (in order), or give an encode output directory: its manifest lists
the shards of each text key, which must all be done (an encode run as several tasks is first gathered
from the tasks' manifest parts, which must cover every shard exactly once: gather.py), and the default
output is `<dir>/<name>` (or `<dir>/<name>_<key>` per key with several keys). The result is written
under temp names, fsynced and renamed. Merging the shards of an encode equals encoding everything into one shard, byte for byte.

The output is byte-identical to Megatron-core's `IndexedDatasetBuilder` given the same prefixes with
`add_index` and then `finalize` (a test compares them): the `.bin` files are appended one after the
other with an in-kernel copy, and the `.idx` is rebuilt with numpy from the inputs' own arrays: the
sequence lengths concatenated, the byte pointers recomputed from the lengths (as the builder does), and
each input's document indices shifted by the number of sequences before it (its leading 0 dropped).
Why not the builder itself: importing megatron.core (torch) costs ~5 CPU-seconds, more than copying a
corpus of a few hundred MB, and it keeps every length in a Python list. The index is streamed input by
input, so memory stays bounded by the largest input's index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_prep.common import PrepError, ensure_writable_parent
from data_prep.gather import gather_parts
from data_prep.indexed import DTYPE_CODES, INDEX_HEADER, INDEX_VERSION, bin_path, idx_path

# header: magic, version (u64), dtype code (u8), sequence count (u64), document-index count (u64)
_HEADER = struct.Struct("<9sQBQQ")
_DTYPES_BY_CODE = {code: np.dtype(name) for name, code in DTYPE_CODES.items()}
_POINTER_CHUNK = 1 << 22  # sequences per step when recomputing byte pointers (32 MiB of int64)
_COPY_STEP = 1 << 30  # bytes per copy_file_range call


@dataclass
class IndexedInput:
    """One dataset to merge: the fields of its `.idx` header, checked against its `.bin`.

    The arrays are read from the file when needed (one input at a time), not kept: a merge of thousands
    of shards holds neither their indexes in memory nor a file handle per shard.
    """

    prefix: str
    dtype: np.dtype
    sequences: int
    document_entries: int  # length of document_indices: documents + 1
    bin_bytes: int

    def lengths(self) -> np.ndarray:
        """int32 tokens per sequence."""
        return np.fromfile(idx_path(self.prefix), dtype=np.int32, count=self.sequences, offset=_HEADER.size)

    def document_indices(self) -> np.ndarray:
        """int64 sequence index where each document starts, then the sequence count."""
        return np.fromfile(idx_path(self.prefix), dtype=np.int64, count=self.document_entries,
                           offset=_HEADER.size + self.sequences * 12)


def read_indexed_input(prefix: str) -> IndexedInput:
    """Read and check the `.idx` header of `prefix` against the file sizes; errors name the file."""
    idx, binf = idx_path(prefix), bin_path(prefix)
    if not (os.path.isfile(binf) and os.path.isfile(idx)):
        raise PrepError(f"not an indexed dataset (missing .bin or .idx): {prefix}")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise PrepError(f"{idx}: not a Megatron index file (bad or missing header)")
    _, version, code, sequences, doc_entries = _HEADER.unpack(head)
    if version != INDEX_VERSION:
        raise PrepError(f"{idx}: index version {version}, only version {INDEX_VERSION} is supported")
    if code not in _DTYPES_BY_CODE:
        raise PrepError(f"{idx}: unknown token dtype code {code}")
    needed = _HEADER.size + sequences * (4 + 8) + doc_entries * 8
    if size < needed:
        raise PrepError(f"{idx} is truncated: {size:,} bytes, but its header announces {sequences:,} sequences "
                        f"and {doc_entries:,} document indices ({needed:,} bytes)")
    found = IndexedInput(prefix, _DTYPES_BY_CODE[code], sequences, doc_entries, os.path.getsize(binf))
    tokens = int(found.lengths().sum(dtype=np.int64))
    if found.bin_bytes != tokens * found.dtype.itemsize:
        raise PrepError(f"{binf} holds {found.bin_bytes:,} bytes but {idx} describes {tokens:,} {found.dtype.name} "
                        f"tokens ({tokens * found.dtype.itemsize:,} bytes): the two files do not belong together")
    return found


def _check_one_dtype(inputs: list[IndexedInput]) -> np.dtype:
    dtypes = {i.dtype for i in inputs}
    if len(dtypes) != 1:
        found = ", ".join(f"{idx_path(i.prefix)}: {i.dtype.name}" for i in inputs)
        raise PrepError(f"cannot merge datasets of different token dtypes ({found})")
    return dtypes.pop()


def _append_file(src_path: str, dst_fd: int) -> int:
    """Append the file at src_path to dst_fd (at its position) in the kernel; returns the bytes copied."""
    size = os.path.getsize(src_path)
    copied = 0
    with open(src_path, "rb", buffering=0) as src:
        try:
            while copied < size:
                n = os.copy_file_range(src.fileno(), dst_fd, min(_COPY_STEP, size - copied))
                if n == 0:
                    break
                copied += n
        except OSError as err:  # another filesystem on an old kernel, or no copy_file_range: copy in userspace
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) or copied:
                raise
            with os.fdopen(os.dup(dst_fd), "wb", buffering=0) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            copied = size
    if copied != size:
        raise PrepError(f"{src_path} changed size while it was being merged ({copied:,} of {size:,} bytes copied)")
    return copied


def _write_index(f, inputs: list[IndexedInput], dtype: np.dtype) -> None:
    """The merged `.idx`, laid out as Megatron's _IndexWriter writes it."""
    sequences = sum(i.sequences for i in inputs)
    doc_entries = 1 + sum(max(i.document_entries - 1, 0) for i in inputs)
    f.write(_HEADER.pack(INDEX_HEADER, INDEX_VERSION, DTYPE_CODES[dtype.name], sequences, doc_entries))
    for i in inputs:
        f.write(memoryview(i.lengths()))
    pointer = 0  # byte offset of the next sequence in the merged .bin
    for i in inputs:
        lengths = i.lengths()
        for lo in range(0, i.sequences, _POINTER_CHUNK):
            sizes = lengths[lo : lo + _POINTER_CHUNK].astype(np.int64) * dtype.itemsize
            ends = np.cumsum(sizes) + pointer
            f.write(memoryview(ends - sizes))
            pointer = int(ends[-1])
    f.write(memoryview(np.zeros(1, np.int64)))
    before = 0  # sequences of the inputs before this one
    for i in inputs:
        f.write(memoryview(i.document_indices()[1:] + before))
        before += i.sequences


def merge_prefixes(prefixes: list[str], output_prefix: str) -> dict:
    """Merge `prefixes` (in order) into `output_prefix`; returns counts, bytes written and seconds."""
    t0 = time.perf_counter()
    if not prefixes:
        raise PrepError("nothing to merge")
    inputs = [read_indexed_input(p) for p in prefixes]
    dtype = _check_one_dtype(inputs)
    out = ensure_writable_parent(output_prefix)
    if out in {os.path.abspath(p) for p in prefixes}:
        raise PrepError("the output prefix must differ from the inputs")
    tmp_bin, tmp_idx = bin_path(out) + ".tmp", idx_path(out) + ".tmp"
    try:
        with open(tmp_bin, "wb", buffering=0) as f:
            for i in inputs:
                _append_file(bin_path(i.prefix), f.fileno())
            os.fsync(f.fileno())
        with open(tmp_idx, "wb", buffering=8 << 20) as f:
            _write_index(f, inputs, dtype)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, bin_path(out))
        os.replace(tmp_idx, idx_path(out))
    except BaseException:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.unlink(path)
        raise
    written = os.path.getsize(bin_path(out)) + os.path.getsize(idx_path(out))
    return {
        "prefix": out,
        "sources": len(inputs),
        "documents": sum(max(i.document_entries - 1, 0) for i in inputs),
        "sequences": sum(i.sequences for i in inputs),
        "tokens": sum(i.bin_bytes for i in inputs) // dtype.itemsize,
        "dtype": dtype.name,
        "bytes": written,
        "seconds": time.perf_counter() - t0,
    }


def merge_encode_dir(out_dir: str, keys: Optional[list[str]] = None, output_prefix: Optional[str] = None) -> list[dict]:
    """Merge the shards of a complete encode in `out_dir`, per text key. An encode run as tasks is gathered
    first: its manifest parts checked, manifest.json and rejects.jsonl written (gather.py)."""
    manifest = gather_parts(out_dir)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if manifest is None and not os.path.isfile(manifest_path):
        raise PrepError(f"{out_dir} has no manifest.json (not an fpa-prep encode output?)")
    if manifest is None:
        with open(manifest_path) as f:
            manifest = json.load(f)
    if manifest.get("status") != "complete":
        raise PrepError(f"the encode in {out_dir} is not complete ({manifest.get('shards_done')} of "
                        f"{manifest['settings']['num_shards']} shards): re-run the same encode command first")
    datasets = manifest["datasets"]
    keys = keys or list(datasets)
    unknown = [k for k in keys if k not in datasets]
    if unknown:
        raise PrepError(f"unknown text key(s) {unknown}; the encode has {list(datasets)}")
    if output_prefix and len(keys) > 1:
        raise PrepError("--output-prefix needs a single --key when the encode has several text keys")
    results = []
    for key in keys:
        d = datasets[key]
        if not d["shards"]:
            raise PrepError(f"the encode in {out_dir} has no document for key {key!r}: nothing to merge")
        out = output_prefix or os.path.join(out_dir, d["merged_prefix"])
        results.append({"key": key, **merge_prefixes([os.path.join(out_dir, s) for s in d["shards"]], out)})
    return results


def describe_merge(result: dict) -> str:
    """The one-line summary `fpa-prep merge` prints for one merged dataset."""
    rate = result["bytes"] / 1e6 / max(result["seconds"], 1e-9)
    return (f"merged {result['sources']} dataset(s) -> {result['prefix']}: {result['documents']:,} documents, "
            f"{result['tokens']:,} tokens ({result['dtype']}); {result['bytes'] / 1e6:,.1f} MB in "
            f"{result['seconds']:.2f} s ({rate:,.0f} MB/s)")
