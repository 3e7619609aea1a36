"""The data section of the config check: prefixes, weights, split, and each indexed dataset's files.

Runs before any process group (from `preflight.check_config`). A `.bin` cut short (a truncated copy), an
`.idx` that is not Megatron's, or token ids stored in a dtype too small for the vocabulary would otherwise fail
deep in the data loader, naming no file; here the error names the file and both sizes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fpa_megatron.config import ConfigError, RunConfig
from fpa_megatron.options import EVAL_SPLITS
from fpa_megatron.run_tokenizer import load_run_tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"  # Megatron-core's .idx header: magic, version 1 (<Q), dtype code (<B), counts
INDEX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


def parse_split(split) -> tuple[float, float, float]:
    """'98,1,1' -> (98.0, 1.0, 1.0): three non-negative numbers with a positive sum (train,valid,test)."""
    parts = str(split).replace("/", ",").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"data.split={split!r} must be three non-negative numbers 'train,valid,test' with a "
                          f"positive sum")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class IndexSummary:
    """What a `<prefix>.idx` says about its dataset."""

    sequence_count: int
    document_count: int
    dtype_name: str  # numpy name of the token dtype (uint16, int32, ...)
    dtype_size: int
    dtype_max: int  # the largest token id the dtype can hold
    bin_bytes: int  # what `<prefix>.bin` must hold: sum of the sequence lengths x dtype size


def read_index(prefix: str) -> IndexSummary:
    """Check `<prefix>.idx` (header, version, dtype code, its own length) and read it with Megatron's own index
    reader (sequence lengths, token dtype). ConfigError naming the file otherwise."""
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, _IndexReader

    path = f"{prefix}.idx"
    with open(path, "rb") as f:
        header = f.read(INDEX_HEADER_BYTES)
    if len(header) < INDEX_HEADER_BYTES or header[:9] != INDEX_MAGIC:
        raise ConfigError(f"{path} is not a Megatron-core index file (bad or truncated header)")
    version, code = struct.unpack("<Q", header[9:17])[0], header[17]
    if version != 1:
        raise ConfigError(f"{path} is not a Megatron-core index file: version {version}, expected 1")
    if code not in {d.value for d in DType}:
        raise ConfigError(f"{path}: token dtype code {code} is not one of Megatron's "
                          f"({', '.join(f'{d.value}={d.name}' for d in DType)})")
    sequences, documents = struct.unpack("<QQ", header[18:34])
    expected_idx = INDEX_HEADER_BYTES + sequences * (4 + 8) + documents * 8  # lengths, pointers, document starts
    actual_idx = os.path.getsize(path)
    if actual_idx < expected_idx:
        raise ConfigError(f"{path} is {actual_idx} bytes but its header ({sequences} sequences, {documents} "
                          f"documents) needs {expected_idx}: the index is truncated")
    reader = _IndexReader(path, multimodal=False)
    try:
        dtype = reader.dtype
        token_bytes = int(reader.sequence_lengths.sum(dtype=numpy.int64)) * reader.dtype_size
        return IndexSummary(sequences, documents, dtype.__name__, reader.dtype_size, int(numpy.iinfo(dtype).max)
                            if numpy.issubdtype(dtype, numpy.integer) else 2 ** 24, token_bytes)
    finally:
        del reader  # drops its memory map of the index


def check_dataset_files(i: int, prefix: str, vocab_size: Optional[int], key: Optional[str] = None) -> IndexSummary:
    """`<prefix>.bin` holds exactly what `<prefix>.idx` indexes, in a dtype that can hold every token id (errors
    name `key`, by default data.prefixes[i])."""
    key = key or f"data.prefixes[{i}]"
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(f"{prefix}{suffix}"):
            raise ConfigError(f"{key}={str(prefix)!r}: {prefix}{suffix} does not exist")
    index = read_index(prefix)
    actual = os.path.getsize(f"{prefix}.bin")
    if actual != index.bin_bytes:
        raise ConfigError(
            f"{key}={str(prefix)!r}: {prefix}.bin is {actual} bytes, but {prefix}.idx indexes "
            f"{index.bin_bytes} bytes ({index.sequence_count} sequences of {index.dtype_name}): the .bin is "
            f"{'truncated (a cut copy?)' if actual < index.bin_bytes else 'longer than its index'}; copy or "
            f"encode it again")
    if vocab_size is not None and vocab_size - 1 > index.dtype_max:
        raise ConfigError(
            f"{key}={str(prefix)!r}: {prefix}.idx stores tokens as {index.dtype_name} (ids up to "
            f"{index.dtype_max}), but the vocabulary has {vocab_size} pieces: ids above {index.dtype_max} cannot "
            f"have been stored; encode the data again with this tokenizer")
    return index


def _check_splits(cfg: RunConfig, counts: list[int]) -> None:
    """Every split that gets a share must get a sequence of every prefix (Megatron's builder cannot build an
    empty split), and evaluation needs a validation split at all."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    d, t = cfg.data, cfg.train
    if t.eval_interval > 0 and parse_split(d.split)[1] == 0:
        raise ConfigError(f"train.eval_interval={t.eval_interval} evaluates on the validation split, but "
                          f"data.split={d.split!r} gives it no share: set one (e.g. data.split='98,1,1') or "
                          f"train.eval_interval=0")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(str(d.split).replace("/", ",")))
    for i, (prefix, count) in enumerate(zip(d.prefixes, counts)):
        for name, bookends in zip(("train", "validation", "test"), matrix):
            if bookends is not None and round(bookends[0] * count) == round(bookends[1] * count):
                raise ConfigError(
                    f"data.prefixes[{i}]={str(prefix)!r} has {count} documents, and its {name} split under "
                    f"data.split={d.split!r} gets none of them (Megatron cannot build an empty split): use the "
                    f"merged dataset or a larger prefix, or give that split no share")


def _check_encoded_with_tokenizer(cfg: RunConfig) -> None:
    """A prefix written by `fpa-prep encode` records its tokenizer's sha256 in manifest.json next to it;
    token ids only mean something under that tokenizer. Data without a manifest is not checked."""
    d = cfg.data
    if d.mock or d.tokenizer is None:
        return
    ours = None
    for i, prefix in enumerate(d.prefixes):
        manifest_path = Path(prefix).parent / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            recorded = manifest["tokenizer"]
            names = {ds.get("merged_prefix") for ds in manifest["datasets"].values()}
            names |= {s for ds in manifest["datasets"].values() for s in ds.get("shards", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no (readable) manifest: data from elsewhere
        if Path(prefix).name not in names:
            continue  # the manifest describes other datasets
        if ours is None:
            tok = load_run_tokenizer(d.tokenizer)
            ours = tok.sha256
        if recorded.get("sha256") == ours and recorded.get("eod_id", tok.eod_id) != tok.eod_id:
            raise ConfigError(
                f"data.prefixes[{i}]={str(prefix)!r} was encoded with the end-of-document token "
                f"{recorded.get('eod_piece')!r}={recorded.get('eod_id')} (fpa-prep encode --eod-piece, per "
                f"{manifest_path}), but training, export and generation take EOD from data.tokenizer's eos "
                f"{tok.eod_piece!r}={tok.eod_id}: make that token the tokenizer's eos, or encode again without "
                f"--eod-piece")
        if recorded.get("sha256") != ours:
            raise ConfigError(
                f"data.prefixes[{i}]={str(prefix)!r} was encoded with the tokenizer {recorded.get('path')!r} "
                f"(sha256 {str(recorded.get('sha256'))[:12]}..., per {manifest_path}), but data.tokenizer="
                f"{d.tokenizer!r} is another model (sha256 {ours[:12]}...): its token ids would be read as other "
                f"pieces. Set data.tokenizer to the encoding tokenizer, or encode the data again with this one")


def excluded_samples(entries) -> list[int]:
    """`data.exclude_samples`: global sample indices, and forensics files whose samples are taken."""
    samples = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0:
            samples.append(entry)
            continue
        path = Path(str(entry))
        try:
            samples.extend(int(s["sample"]) for s in json.loads(path.read_text())["samples"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"data.exclude_samples: {entry!r} is neither a sample index >= 0 nor a readable "
                              f"forensics file (<run dir>/forensics/step_*.json): {err}") from None
    return sorted(set(samples))


def validation_sets(validation) -> dict[str, tuple[list[str], Optional[list[float]]]]:
    """`data.validation` as name -> (prefixes, weights or None): a value is a prefix, a list of prefixes (blended
    by size) or {prefixes: [...], weights: [...]}. ConfigError naming the entry otherwise."""
    if not isinstance(validation, dict):
        raise ConfigError(f"data.validation={validation!r} must be a mapping name -> prefix (or a blend)")
    out = {}
    for name, value in validation.items():
        key = f"data.validation.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{key}: a validation set's name is letters, digits, '_', '.' or '-' (it names the "
                              f"curve val/<name>/loss and fpa-eval --split <name>)")
        if name in EVAL_SPLITS:
            raise ConfigError(f"{key}: the name {name!r} is taken by the training blend's own split (fpa-eval --split "
                              f"{name}): choose another name")
        weights = None
        if isinstance(value, str):
            prefixes = [value]
        elif isinstance(value, list):
            prefixes = value
        elif isinstance(value, dict) and set(value) <= {"prefixes", "weights"} and "prefixes" in value:
            prefixes, weights = value["prefixes"], value.get("weights")
        else:
            raise ConfigError(f"{key}={value!r} must be a prefix, a list of prefixes or {{prefixes: [...], "
                              f"weights: [...]}}")
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ConfigError(f"{key}={value!r}: its prefixes must be a non-empty list of paths")
        if weights is not None and (not isinstance(weights, list) or len(weights) != len(prefixes) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                for w in weights)):
            raise ConfigError(f"{key}.weights={weights!r} must be {len(prefixes)} positive numbers, one per prefix")
        out[name] = (list(prefixes), None if weights is None else [float(w) for w in weights])
    return out


def _check_validation_sets(cfg: RunConfig, vocab_size: Optional[int]) -> None:
    """Every named validation set's files, and a cadence that evaluates them."""
    sets = validation_sets(cfg.data.validation)
    if sets and cfg.train.eval_interval <= 0:
        raise ConfigError(f"data.validation names {', '.join(sets)}, but train.eval_interval="
                          f"{cfg.train.eval_interval} never evaluates: set train.eval_interval > 0")
    for name, (prefixes, _) in sets.items():
        for j, prefix in enumerate(prefixes):
            key = f"data.validation.{name}" + (f"[{j}]" if len(prefixes) > 1 else "")
            if check_dataset_files(j, prefix, vocab_size, key).bin_bytes == 0:
                raise ConfigError(f"{key}={prefix!r} holds no token")


def check_data(cfg: RunConfig, vocab_size: Optional[int]) -> None:
    """The data section: split, weights, and (unless data.mock) every prefix's files against each other and
    against `vocab_size` (the tokenizer's, else model.vocab_size), the splits, the encoding tokenizer."""
    d = cfg.data
    parse_split(d.split)
    if not isinstance(d.eod_mask_loss, bool):
        raise ConfigError(f"data.eod_mask_loss={d.eod_mask_loss!r} must be true or false")
    if not isinstance(d.document_mask, bool):
        raise ConfigError(f"data.document_mask={d.document_mask!r} must be true or false")
    if not isinstance(d.exclude_samples, list):
        raise ConfigError(f"data.exclude_samples={d.exclude_samples!r} must be a list")
    excluded_samples(d.exclude_samples)  # every entry an index or a readable forensics file
    _check_validation_sets(cfg, vocab_size)
    if d.weights is not None:
        if len(d.weights) != len(d.prefixes):
            raise ConfigError(f"data.weights={d.weights!r} has {len(d.weights)} entries but data.prefixes has "
                              f"{len(d.prefixes)}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                   for w in d.weights):
            raise ConfigError(f"data.weights={d.weights!r} must all be positive numbers (Megatron's dataset builder "
                              f"rejects a weight of 0: drop that prefix from data.prefixes instead)")
    if d.mock:
        return
    if not d.prefixes:
        raise ConfigError("data.prefixes=[] is empty: set data.prefixes=[path/prefix,...] (each with .bin and .idx)"
                          " or data.mock=true")
    for i, prefix in enumerate(d.prefixes):  # every file exists before any is read
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(f"{prefix}{suffix}"):
                raise ConfigError(f"data.prefixes[{i}]={str(prefix)!r}: {prefix}{suffix} does not exist")
    indexes = [check_dataset_files(i, prefix, vocab_size) for i, prefix in enumerate(d.prefixes)]
    _check_splits(cfg, [index.sequence_count for index in indexes])
    _check_encoded_with_tokenizer(cfg)
