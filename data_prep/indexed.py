"""Writers for one Megatron-core indexed dataset (`<prefix>.bin` + `<prefix>.idx`), one sequence per document.

Two interchangeable writers produce the same bytes (a test compares them, and compares both against
`IndexedDatasetBuilder` fed the same token arrays):
- `MegatronShardWriter` drives Megatron-core's own `IndexedDatasetBuilder`;
- `NativeShardWriter` (the default for encode workers) writes the identical layout with numpy only.
Why two: importing `megatron.core` pulls in torch and costs ~4 CPU-seconds per process; spawned encode
workers that pay it lose most of the 1-vs-2-worker scaling on a 50 MB corpus. The layout written
natively is the one of Megatron-core 0.16's `_IndexWriter` (header, version 1, dtype code, counts,
int32 lengths, int64 byte pointers, int64 document indices); outputs are read back with `IndexedDataset`.

A document may be added in pieces (a very large document is tokenized piece by piece): the pieces are
streamed to the .bin file and still form ONE sequence, so GPTDataset (which treats sequences as
documents) sees the document whole.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable

import numpy as np

from data_prep.common import fsync_close

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType codes (checked against Megatron by a test)
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class NativeShardWriter:
    """Writes `<bin_file>` and, on finalize, `<idx_file>`; numpy only (no torch import)."""

    def __init__(self, bin_file: str, dtype: str):
        self.dtype = np.dtype(dtype)
        self._f = open(bin_file, "wb", buffering=1 << 20)
        self.lengths: list[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        """One document = one sequence; `tokens` already has the writer's dtype."""
        self._f.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        self.lengths.append(len(tokens))

    def add_document_pieces(self, pieces: Iterable[np.ndarray]) -> int:
        """Stream the pieces of one document; they form one sequence. Returns its length."""
        n = 0
        for piece in pieces:
            self._f.write(memoryview(np.ascontiguousarray(piece, dtype=self.dtype)))
            n += len(piece)
        self.lengths.append(n)
        return n

    def finalize(self, idx_file: str) -> None:
        fsync_close(self._f)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        count = len(lengths)
        pointers = np.zeros(count, dtype=np.int64)
        if count > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(idx_file, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<Q", count))
            f.write(struct.pack("<Q", count + 1))  # document_indices has a leading 0
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(count + 1, dtype=np.int64).tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        self._f.close()


class MegatronShardWriter:
    """Same interface, through megatron.core's IndexedDatasetBuilder (imports torch: slower startup).

    A document in pieces is gathered into one array (2-4 bytes per token) before `add_document`.
    """

    def __init__(self, bin_file: str, dtype: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.dtype = np.dtype(dtype)
        self._builder = IndexedDatasetBuilder(bin_file, dtype=self.dtype.type)
        self.lengths = self._builder.sequence_lengths

    def add_document(self, tokens: np.ndarray) -> None:
        self._builder.add_document(tokens, [len(tokens)])

    def add_document_pieces(self, pieces: Iterable[np.ndarray]) -> int:
        tokens = np.concatenate([np.asarray(p, dtype=self.dtype) for p in pieces])
        self.add_document(tokens)
        return len(tokens)

    def finalize(self, idx_file: str) -> None:
        self._builder.data_file.flush()
        os.fsync(self._builder.data_file.fileno())
        self._builder.finalize(idx_file)

    def abort(self) -> None:
        self._builder.data_file.close()


WRITERS = {"native": NativeShardWriter, "megatron": MegatronShardWriter}
