"""Shared helpers for the data_prep tests: corpora written to tmp dirs, datasets read back with Megatron."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

UNICODE_DOCS = [
    "Grüße aus Köln: ÄÖÜ äöü ß, façade, naïve café.",
    "日本語のテキストと中文文本，混合 scripts 😀🚀 and emoji.",
    "tabs\tand  double  spaces\n\n  leading and trailing  \n",
    "Ελληνικά κείμενα και русский текст, עברית, العربية.",
    "x = [i ** 2 for i in range(10)]  # code\n    return {'k': v}\n",
]


def write_jsonl(path: str, records: list, key: str = "text") -> str:
    """One JSON object per line; a str record becomes {key: record}; bytes are written raw (bad lines)."""
    with open(path, "wb") as f:
        for r in records:
            if isinstance(r, bytes):
                f.write(r.rstrip(b"\n") + b"\n")
            elif isinstance(r, str):
                f.write((json.dumps({key: r}, ensure_ascii=False) + "\n").encode("utf-8"))
            else:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def read_documents(prefix: str) -> list[np.ndarray]:
    """Each document of an indexed dataset (all its sequences concatenated), read by Megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    doc_idx = np.asarray(ds.document_indices)
    docs = []
    for d in range(len(doc_idx) - 1):
        parts = [np.array(ds[i], dtype=np.int64) for i in range(int(doc_idx[d]), int(doc_idx[d + 1]))]
        docs.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    del ds
    return docs


def read_encode(out_dir: str) -> dict:
    """{key: [documents in shard order]} for an encode output directory, using its manifest."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    out = {}
    for key, d in manifest["datasets"].items():
        docs = []
        for shard in d["shards"]:
            docs.extend(read_documents(os.path.join(out_dir, shard)))
        out[key] = docs
    return out


def file_bytes(out_dir: str) -> dict:
    """{relative path: bytes} of every output file (state dir included) of an encode directory."""
    out = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, out_dir)] = f.read()
    return out


def expected_tokens(sp, text: str, eod: int) -> list[int]:
    """The reference: sentencepiece called directly, plus the end-of-document token."""
    return sp.encode(text) + [eod]


def encode(out_dir, inputs, model, **kw) -> dict:
    """Run `fpa-prep encode` in-process (no progress bar) and return its manifest; it must succeed."""
    from data_prep.encode import EncodeOptions, run_encode

    manifest, status = run_encode(EncodeOptions(inputs=inputs, tokenizer=model, out_dir=str(out_dir),
                                                progress=False, **kw))
    assert status == 0
    return manifest


def make_corpus(directory, docs: list[str], copies: int = 3) -> list[str]:
    """Several input files (the last one gzip-compressed) with a few bad records among the documents."""
    paths = []
    for c in range(copies):
        records = []
        for i, text in enumerate(docs):
            records.append(f"file {c} doc {i}\n{text}")
            if i % 17 == 3:
                records.append(b'{"text": 7}' if i % 2 else b"{not json")
        path = write_jsonl(os.path.join(directory, f"part_{c}.jsonl"), records)
        if c == copies - 1:
            with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
                g.write(f.read())
            os.unlink(path)
            path += ".gz"
        paths.append(path)
    return paths
