"""The run's tokenizer (`data.tokenizer`): loaded by fpa-prep's loader, errors as ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

from data_prep.common import PrepError
from data_prep.tokenizer import load_tokenizer

from fpa_megatron.config import ConfigError


def load_run_tokenizer(path: str):
    """data.tokenizer (a sentencepiece .model, a tokenizer.json or a directory with one) loaded by fpa-prep's
    loader, or ConfigError naming data.tokenizer."""
    if not Path(path).exists():
        raise ConfigError(f"data.tokenizer={path!r} does not exist")
    try:
        return load_tokenizer(str(path))
    except PrepError as err:  # (training takes EOD from the tokenizer's eos: a tokenizer_config.json eos_token)
        raise ConfigError(f"data.tokenizer={path!r} cannot be used: {err}") from None


def tokenizer_vocab_size(path: str) -> int:
    """Vocabulary size of the tokenizer at `path`, or ConfigError naming data.tokenizer."""
    return int(load_run_tokenizer(path).vocab_size)
