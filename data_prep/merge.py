"""`fpa-prep merge`: concatenate shard datasets into one prefix with Megatron-core's IndexedDatasetBuilder.

Either name the prefixes to merge (in order), or give an encode output directory: its manifest lists
the shards of each text key, which must all be done, and the default output is `<dir>/<name>` (or
`<dir>/<name>_<key>` per key with several keys). The result is written under temp names and renamed.
Merging the shards of an encode equals encoding everything into one shard, byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from data_prep.common import PrepError, ensure_writable_parent
from data_prep.indexed import bin_path, idx_path


def merge_prefixes(prefixes: list[str], output_prefix: str) -> dict:
    """Merge `prefixes` (in order) into `output_prefix`; returns counts of the result."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    if not prefixes:
        raise PrepError("nothing to merge")
    for p in prefixes:
        if not (os.path.isfile(bin_path(p)) and os.path.isfile(idx_path(p))):
            raise PrepError(f"not an indexed dataset (missing .bin or .idx): {p}")
    out = ensure_writable_parent(output_prefix)
    if out in {os.path.abspath(p) for p in prefixes}:
        raise PrepError("the output prefix must differ from the inputs")
    dtypes = set()
    for p in prefixes:
        dtypes.add(IndexedDataset(p).index.dtype)
    if len(dtypes) != 1:
        raise PrepError(f"cannot merge datasets of different token dtypes: {sorted(d.__name__ for d in dtypes)}")
    dtype = dtypes.pop()
    builder = IndexedDatasetBuilder(bin_path(out) + ".tmp", dtype=dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(idx_path(out) + ".tmp")
    os.replace(bin_path(out) + ".tmp", bin_path(out))
    os.replace(idx_path(out) + ".tmp", idx_path(out))
    merged = IndexedDataset(out)
    return {
        "prefix": out,
        "sources": len(prefixes),
        "documents": int(len(merged.document_indices) - 1),
        "sequences": int(len(merged)),
        "tokens": int(merged.sequence_lengths.sum(dtype="int64")),
        "dtype": dtype.__name__,
    }


def merge_encode_dir(out_dir: str, keys: Optional[list[str]] = None, output_prefix: Optional[str] = None) -> list[dict]:
    """Merge the shards of a complete encode in `out_dir`, per text key."""
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise PrepError(f"{out_dir} has no manifest.json (not an fpa-prep encode output?)")
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
