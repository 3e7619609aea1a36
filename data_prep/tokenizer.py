"""Train and load sentencepiece tokenizers.

Training reads the corpus once, keeps a seeded uniform sample of its lines (reservoir sampling), and hands
that sample to sentencepiece. Defaults keep text exactly recoverable (decode(encode(x)) == x): identity
normalization, whitespace kept as is, no dummy prefix, byte fallback for unseen characters, digits split.
Special pieces: <unk>=0, <s>=1, </s>=2 (the end-of-document token, EOD), <pad>=3, then user symbols.
Next to `<out>.model` and `<out>.vocab` a `<out>.json` records the settings, the sample and the model hash.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from data_prep.common import PrepError, atomic_write_json, ensure_writable_parent, sha256_file

SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass
class TokenizerInfo:
    """What encode needs to know about a tokenizer: its path, hash, vocabulary, EOD id and token dtype."""

    path: str
    sha256: str
    vocab_size: int
    eod_id: int
    eod_piece: str

    @property
    def dtype_name(self) -> str:
        """uint16 below 65500 pieces, else int32: Megatron's `DType.optimal_dtype` rule."""
        return token_dtype_name(self.vocab_size)

    def describe(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "eod_piece": self.eod_piece,
            "dtype": self.dtype_name,
        }


def token_dtype_name(vocab_size: int) -> str:
    """Same rule as megatron.core.datasets.indexed_dataset.DType.optimal_dtype (checked by a test)."""
    return "uint16" if vocab_size < 65500 else "int32"


def load_processor(path: str):
    """A SentencePieceProcessor for `path`, or a PrepError saying why it cannot be used."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise PrepError(f"tokenizer model not found: {path}")
    if not os.access(path, os.R_OK):
        raise PrepError(f"tokenizer model not readable: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except Exception as err:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError on bad files
        raise PrepError(f"cannot load tokenizer {path}: {err}") from None
    if ok is False:
        raise PrepError(f"cannot load tokenizer {path}")
    return sp


def tokenizer_info(path: str, eod_piece: Optional[str] = None) -> TokenizerInfo:
    """Load and describe a tokenizer; EOD is `eod_piece` if given, else the model's eos piece."""
    sp = load_processor(path)
    if eod_piece is not None:
        eod = sp.piece_to_id(eod_piece)
        if eod == sp.unk_id() and eod_piece != sp.id_to_piece(sp.unk_id()):
            raise PrepError(f"tokenizer {path} has no piece {eod_piece!r} (--eod-piece)")
    else:
        eod = sp.eos_id()
        if eod < 0:
            raise PrepError(f"tokenizer {path} has no eos piece; name the end-of-document piece with --eod-piece")
    return TokenizerInfo(os.path.abspath(path), sha256_file(path), sp.vocab_size(), int(eod), sp.id_to_piece(eod))


class ReservoirSampler:
    """Uniform sample of k items from a stream of unknown length (Li's algorithm L), seeded."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = random.Random(seed)
        self.items: list = []
        self.seen = 0
        self._w = math.exp(math.log(self._u()) / k) if k > 0 else 0.0
        self._next = k + self._skip()

    def _u(self) -> float:
        return self.rng.random() or 1e-300

    def _skip(self) -> int:
        if self._w >= 1.0:
            return 1 << 62
        return int(math.floor(math.log(self._u()) / math.log1p(-self._w))) if self._w > 0 else 0

    def add(self, item) -> None:
        i = self.seen
        self.seen += 1
        if i < self.k:
            self.items.append(item)
        elif i == self._next:
            self.items[self.rng.randrange(self.k)] = item
            self._w *= math.exp(math.log(self._u()) / self.k)
            self._next += self._skip() + 1


def document_lines(text: str, max_chars: int) -> Iterator[str]:
    """The non-blank lines of a document, cut to max_chars (sentencepiece trains on 'sentences')."""
    for line in text.split("\n"):
        if line and not line.isspace():
            yield line[:max_chars]


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    sample_size: int = 300_000,
    seed: int = 1234,
    user_defined_symbols: tuple = (),
    control_symbols: tuple = (),
    eod_piece: str = SPECIAL_PIECES["eos"],
    normalization: str = "identity",
    add_dummy_prefix: bool = False,
    split_digits: bool = True,
    max_sentence_chars: int = 4096,
    num_threads: Optional[int] = None,
    extra_settings: Optional[dict] = None,
) -> dict:
    """Sample `sample_size` lines of `texts` with `seed`, train sentencepiece, write model/vocab/json.

    Returns the settings dict written to `<out_prefix>.json`.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise PrepError(f"--model-type must be bpe or unigram, not {model_type!r}")
    if sample_size <= 0:
        raise PrepError("--sample-size must be positive")
    out_prefix = ensure_writable_parent(out_prefix)
    t0 = time.time()
    sampler = ReservoirSampler(sample_size, seed)
    documents = 0
    for text in texts:
        documents += 1
        for line in document_lines(text, max_sentence_chars):
            sampler.add(line)
    if not sampler.items:
        raise PrepError("no usable text found in the inputs to train a tokenizer on")
    t_sample = time.time() - t0
    threads = num_threads or len(os.sched_getaffinity(0))
    pieces = SPECIAL_PIECES | {"eos": eod_piece}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sampler.items),
            model_prefix=out_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            normalization_rule_name=normalization,
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            max_sentence_length=max_sentence_chars * 4,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=pieces["unk"],
            bos_piece=pieces["bos"],
            eos_piece=pieces["eos"],
            pad_piece=pieces["pad"],
            user_defined_symbols=list(user_defined_symbols),
            control_symbols=list(control_symbols),
            hard_vocab_limit=True,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise PrepError(f"sentencepiece training failed: {err}") from None
    model = out_prefix + ".model"
    sp = load_processor(model)
    settings = {
        "model": os.path.basename(model),
        "model_sha256": sha256_file(model),
        "sentencepiece_version": spm.__version__,
        "model_type": model_type,
        "vocab_size": sp.vocab_size(),
        "character_coverage": character_coverage,
        "byte_fallback": byte_fallback,
        "normalization": normalization,
        "add_dummy_prefix": add_dummy_prefix,
        "split_digits": split_digits,
        "special_tokens": {name: {"piece": piece, "id": sp.piece_to_id(piece)} for name, piece in pieces.items()},
        "eod": {"piece": eod_piece, "id": sp.eos_id()},
        "user_defined_symbols": list(user_defined_symbols),
        "control_symbols": list(control_symbols),
        "token_dtype": token_dtype_name(sp.vocab_size()),
        "sample": {
            "size": sample_size,
            "seed": seed,
            "lines_sampled": len(sampler.items),
            "lines_seen": sampler.seen,
            "documents_seen": documents,
            "max_sentence_chars": max_sentence_chars,
        },
        "seconds": {"sample": round(t_sample, 2), "total": round(time.time() - t0, 2)},
        **(extra_settings or {}),
    }
    atomic_write_json(out_prefix + ".json", settings)
    return settings


def read_settings(model_path: str) -> Optional[dict]:
    """The `<prefix>.json` written next to a model by `train_tokenizer`, if present."""
    path = os.path.splitext(model_path)[0] + ".json"
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None
