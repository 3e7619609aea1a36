"""The data files are checked before any process group: a cut .bin, a foreign or damaged .idx, token ids in a
dtype too small for the vocabulary. Datasets written by Megatron's own IndexedDatasetBuilder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpa_megatron.config import ConfigError, config_from_dict
from fpa_megatron.preflight import check_config

VOCAB = 300


def write_megatron_dataset(prefix, dtype=np.uint16, documents: int = 50) -> str:
    """documents of 3..9 tokens, through megatron.core's own writer."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in range(documents):
        builder.add_item(torch.arange(d % 7 + 3, dtype=torch.int64) % 250)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _check(prefix: str, **model):
    cfg = config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 8,
                  "vocab_size": VOCAB, **model},
        "data": {"prefixes": [prefix], "split": "80,10,10"},
        "train": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 1, "eval_interval": 0},
        "checkpoint": {"resume": "none"},
    })
    return check_config(cfg, 1)


def test_an_intact_dataset_passes(tmp_path):
    _check(write_megatron_dataset(tmp_path / "ok"))


def test_a_cut_bin_is_refused_naming_the_file_and_both_sizes(tmp_path):
    prefix = write_megatron_dataset(tmp_path / "corpus")
    bin_path = tmp_path / "corpus.bin"
    full = bin_path.stat().st_size
    lengths = [d % 7 + 3 for d in range(50)]
    assert full == sum(lengths) * 2  # uint16: what the index must say, computed independently
    bin_path.write_bytes(bin_path.read_bytes()[: full // 2])
    with pytest.raises(ConfigError) as err:
        _check(prefix)
    message = str(err.value)
    assert f"{bin_path} is {full // 2} bytes" in message and f"indexes {full} bytes" in message
    assert "truncated" in message
    assert not torch.distributed.is_initialized()  # refused before any process group


def test_a_dtype_too_small_for_the_vocabulary_is_refused(tmp_path):
    prefix = write_megatron_dataset(tmp_path / "bytes", dtype=np.uint8)
    with pytest.raises(ConfigError, match=rf"{prefix}\.idx stores tokens as uint8 \(ids up to 255\), but the "
                                          rf"vocabulary has {VOCAB} pieces"):
        _check(prefix)
    _check(prefix, vocab_size=256)  # a vocabulary uint8 can hold


@pytest.mark.parametrize("damage,expected", [
    (lambda b: b[:20], "bad or truncated header"),
    (lambda b: b[:9] + (2).to_bytes(8, "little") + b[17:], "version 2, expected 1"),
    (lambda b: b[:17] + bytes([42]) + b[18:], "token dtype code 42 is not one of Megatron's"),
    (lambda b: b[: len(b) - 16], "the index is truncated"),
], ids=["header", "version", "dtype-code", "cut-idx"])
def test_a_damaged_index_is_refused_naming_it(tmp_path, damage, expected):
    prefix = write_megatron_dataset(tmp_path / "corpus")
    idx = tmp_path / "corpus.idx"
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(ConfigError) as err:
        _check(prefix)
    assert str(idx) in str(err.value) and expected in str(err.value)
