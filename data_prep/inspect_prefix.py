"""`fpa-prep inspect`: counts of an indexed dataset prefix and the first tokens of a few documents, decoded.

The tokenizer is taken from --tokenizer, else from the manifest.json next to the prefix (encode output).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from data_prep.common import PrepError
from data_prep.indexed import bin_path, idx_path
from data_prep.tokenizer import load_tokenizer


def _manifest_tokenizer(prefix: str) -> dict:
    manifest = os.path.join(os.path.dirname(os.path.abspath(prefix)), "manifest.json")
    try:
        with open(manifest) as f:
            return dict(json.load(f)["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def find_tokenizer(prefix: str) -> Optional[str]:
    path = _manifest_tokenizer(prefix).get("path")
    return path if path and os.path.isfile(path) else None


def find_eod_piece(prefix: str) -> Optional[str]:
    """The EOD piece the encode used (its --eod-piece, or the tokenizer's eos), per the manifest."""
    return _manifest_tokenizer(prefix).get("eod_piece")


def inspect_prefix(prefix: str, tokenizer: Optional[str] = None, docs: int = 3, tokens: int = 32) -> str:
    """A human-readable report on `prefix` (returned, the CLI prints it)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not (os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))):
        raise PrepError(f"not an indexed dataset (missing .bin or .idx): {prefix}")
    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_idx = np.asarray(ds.document_indices)
    n_docs = len(doc_idx) - 1
    out = [
        f"prefix:    {os.path.abspath(prefix)}",
        f"dtype:     {ds.index.dtype.__name__}",
        f"documents: {n_docs:,}",
        f"sequences: {len(ds):,}",
        f"tokens:    {int(lengths.sum()):,}",
        f"bin bytes: {os.path.getsize(bin_path(prefix)):,}",
    ]
    if len(lengths):
        out.append(f"sequence length: min {lengths.min():,}, mean {lengths.mean():,.1f}, max {lengths.max():,}")
    eod_piece = None
    if not tokenizer:
        tokenizer, eod_piece = find_tokenizer(prefix), find_eod_piece(prefix)
    tok = None
    if tokenizer:
        tok = load_tokenizer(tokenizer, eod_piece)
        eod = tok.eod_id
        if len(lengths):
            checked = min(n_docs, 10000)
            last_sequences = doc_idx[1 : checked + 1] - 1  # the last sequence of each document
            ends = sum(int(ds.get(int(i), offset=int(lengths[i]) - 1, length=1)[0]) == eod for i in last_sequences)
            out.append(f"tokenizer: {tokenizer} (vocab {tok.vocab_size}); documents ending in EOD "
                       f"{tok.eod_piece!r}: {ends:,} of the first {checked:,}")
    else:
        out.append("tokenizer: none found (pass --tokenizer to decode)")
    for d in range(min(docs, n_docs)):
        first, last = int(doc_idx[d]), int(doc_idx[d + 1])
        ids = np.concatenate([ds[i] for i in range(first, last)]) if last > first else np.zeros(0, np.int64)
        head = [int(t) for t in ids[:tokens]]
        out.append(f"--- document {d}: {len(ids):,} tokens; first {len(head)}: {head}")
        if tok is not None:
            out.append("    " + repr(tok.decode(head)))
    return "\n".join(out)
