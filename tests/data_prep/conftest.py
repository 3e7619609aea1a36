"""Session fixtures: a small built-in (stdlib) corpus and a sentencepiece model trained on it."""

from __future__ import annotations

import pytest

from data_prep.builtin_corpus import gather
from data_prep.tokenizer import train_tokenizer
from tests.data_prep.helpers import UNICODE_DOCS


@pytest.fixture(scope="session")
def stdlib_docs() -> list[str]:
    """About 1 MiB of standard-library source and docstrings, in the corpus order."""
    return [d["text"] for d in gather(1 << 20)]


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory, stdlib_docs) -> str:
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    train_tokenizer(stdlib_docs + UNICODE_DOCS, prefix, vocab_size=2048, sample_size=50_000, seed=7, num_threads=1)
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp(tokenizer_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer_model)


@pytest.fixture(scope="session")
def docs(stdlib_docs) -> list[str]:
    """A mixed set of documents for round trips: stdlib text (varied sizes) plus non-ASCII text."""
    out = []
    for i, text in enumerate(stdlib_docs[:60]):
        out.append(text[: 500 + 97 * i])
    out[5:5] = UNICODE_DOCS
    return out
