"""Train and load tokenizers: sentencepiece `.model` files and Hugging Face `tokenizer.json` files.

Training reads the corpus once, keeps a seeded uniform sample of its lines (reservoir sampling), and hands
that sample to sentencepiece (the default) or to `tokenizers`' byte-level BPE trainer.

sentencepiece defaults keep text exactly recoverable (decode(encode(x)) == x): identity normalization,
whitespace kept as is, no dummy prefix, byte fallback for unseen characters, digits split. Special pieces:
<unk>=0, <s>=1, </s>=2 (the end-of-document token, EOD), <pad>=3, then user symbols. Next to `<out>.model`
and `<out>.vocab` a `<out>.json` records the settings, the sample and the model hash.

Byte-level BPE (GPT-2's scheme: every byte is a symbol, so nothing is unknown and every text round-trips)
writes `<out>/tokenizer.json`, a `tokenizer_config.json` naming the EOD token as eos, and `<out>/settings.json`.

`load_tokenizer` opens either format behind one interface (`Tokenizer`): what encode, training, export and
evaluation use.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from data_prep.common import (PrepError, atomic_write_bytes, atomic_write_json, ensure_writable_dir,
                              ensure_writable_parent, sha256_file)

SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass
class TokenizerInfo:
    """What encode needs to know about a tokenizer: its path, hash, vocabulary, EOD id and token dtype."""

    path: str
    sha256: str
    vocab_size: int
    eod_id: int
    eod_piece: str
    kind: str = "sentencepiece"

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
            "kind": self.kind,
        }


def token_dtype_name(vocab_size: int) -> str:
    """Same rule as megatron.core.datasets.indexed_dataset.DType.optimal_dtype (checked by a test)."""
    return "uint16" if vocab_size < 65500 else "int32"


def load_processor(path: str):
    """A SentencePieceProcessor for `path`, or a PrepError saying why it cannot be used."""
    import sentencepiece as spm

    _check_readable(path)
    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except Exception as err:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError on bad files
        raise PrepError(f"cannot load tokenizer {path} as a sentencepiece model: {err}") from None
    if ok is False:
        raise PrepError(f"cannot load tokenizer {path} as a sentencepiece model")
    return sp


def _check_readable(path: str) -> None:
    if not os.path.isfile(path):
        raise PrepError(f"tokenizer model not found: {path}")
    if not os.access(path, os.R_OK):
        raise PrepError(f"tokenizer model not readable: {path}")


# ----------------------------------------------------------------------------------------------------------
# one interface over both tokenizer formats


HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# special tokens taken as the end-of-document token of a tokenizer.json whose tokenizer_config.json names no
# eos_token (GPT-2 / NeoX, LLaMA 2 / Mistral, LLaMA 3, Gemma), in this order
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
TOKENIZER_KINDS = ("sentencepiece", "huggingface")


def resolve_tokenizer_path(path: str) -> str:
    """The tokenizer file of `path`: a sentencepiece .model, a tokenizer.json, or a directory holding one."""
    if os.path.isdir(path):
        inner = os.path.join(path, HF_TOKENIZER_FILE)
        if not os.path.isfile(inner):
            raise PrepError(f"tokenizer directory {path} has no {HF_TOKENIZER_FILE}")
        path = inner
    _check_readable(path)
    return os.path.abspath(path)


def tokenizer_kind(path: str) -> str:
    """huggingface for a JSON file (a tokenizer.json), else sentencepiece (a binary protobuf .model)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return "huggingface" if head.startswith(b"{") else "sentencepiece"


class Tokenizer:
    """A tokenizer file loaded for encoding: ids, pieces, vocabulary size, EOD and the file's hash.

    `encode` adds no special token (documents are separated by EOD alone); ids are the library's own.
    """

    kind: str
    path: str
    vocab_size: int
    eod_id: int
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None
    unk_id: Optional[int] = None
    # encode prepends a space to every text, even one starting with a space (sentencepiece's dummy prefix):
    # a long document cut before a space then drops that space from the pieces after the first
    dummy_prefix: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    @property
    def eod_piece(self) -> str:
        return self.id_to_piece(self.eod_id)

    @property
    def sha256(self) -> str:
        if not hasattr(self, "_sha256"):
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def info(self) -> "TokenizerInfo":
        return TokenizerInfo(self.path, self.sha256, self.vocab_size, self.eod_id, self.eod_piece, self.kind)


class SentencePieceFile(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str, eod_piece: Optional[str] = None):
        sp = self.sp = load_processor(path)
        self.path, self.vocab_size = path, sp.vocab_size()
        if eod_piece is not None:
            eod = sp.piece_to_id(eod_piece)
            if eod == sp.unk_id() and eod_piece != sp.id_to_piece(sp.unk_id()):
                raise PrepError(f"tokenizer {path} has no piece {eod_piece!r} (--eod-piece)")
        else:
            eod = sp.eos_id()
            if eod < 0:
                raise PrepError(f"tokenizer {path} has no eos piece; name the end-of-document piece with --eod-piece")
        self.eod_id = int(eod)
        self.bos_id, self.pad_id, self.unk_id = (i if i >= 0 else None for i in (sp.bos_id(), sp.pad_id(), sp.unk_id()))
        first = sp.encode("x", out_type=str)
        self.dummy_prefix = bool(first) and first[0].startswith("\u2581")

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def _token_content(value) -> Optional[str]:
    """A tokenizer_config.json special-token entry: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceFile(Tokenizer):
    """A `tokenizers` tokenizer.json; special tokens from the tokenizer_config.json next to it, when there is one.

    EOD: `eod_piece`, else tokenizer_config.json's eos_token, else the first of KNOWN_EOS_TOKENS it has.
    """

    kind = "huggingface"

    def __init__(self, path: str, eod_piece: Optional[str] = None):
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_file(path)
        except Exception as err:  # noqa: BLE001 - tokenizers raises a plain Exception on bad files
            raise PrepError(f"cannot load tokenizer {path} as a Hugging Face tokenizer.json: {err}") from None
        self.path = path
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(len(vocab), max(vocab.values(), default=-1) + 1)  # the embedding rows it needs
        config = self.read_config(path)
        special = {k: _token_content(config.get(k)) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
        self.bos_id, self.pad_id, self.unk_id = (self._id(special[k]) for k in ("bos_token", "pad_token", "unk_token"))
        if eod_piece is not None:
            eod = self._id(eod_piece)
            if eod is None:
                raise PrepError(f"tokenizer {path} has no token {eod_piece!r} (--eod-piece)")
        else:
            eod = self._id(special["eos_token"])
            if eod is None:
                eod = next((self._id(t) for t in KNOWN_EOS_TOKENS if self._id(t) is not None), None)
            if eod is None:
                raise PrepError(f"tokenizer {path} has no eos token (no eos_token in a {HF_TOKENIZER_CONFIG} next to "
                                f"it, none of {', '.join(KNOWN_EOS_TOKENS)}); name the end-of-document token with "
                                f"--eod-piece")
        self.eod_id = int(eod)

    @staticmethod
    def read_config(path: str) -> dict:
        config = os.path.join(os.path.dirname(path), HF_TOKENIZER_CONFIG)
        if not os.path.isfile(config):
            return {}
        try:
            with open(config, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot read {config}: {err}") from None

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            text.encode("utf-8")  # a lone surrogate: raise the UnicodeEncodeError sentencepiece would
            raise

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))


def load_tokenizer(path: str, eod_piece: Optional[str] = None) -> Tokenizer:
    """The tokenizer at `path` (sentencepiece .model, tokenizer.json or a directory with one), or a PrepError."""
    path = resolve_tokenizer_path(path)
    cls = HuggingFaceFile if tokenizer_kind(path) == "huggingface" else SentencePieceFile
    return cls(path, eod_piece)


def tokenizer_info(path: str, eod_piece: Optional[str] = None) -> TokenizerInfo:
    """Load and describe a tokenizer; EOD is `eod_piece` if given, else the tokenizer's eos."""
    return load_tokenizer(path, eod_piece).info()


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


def sample_lines(texts: Iterable[str], sample_size: int, seed: int, max_chars: int) -> tuple[ReservoirSampler, int]:
    """A seeded uniform sample of the non-blank lines of `texts` (and the number of documents read)."""
    if sample_size <= 0:
        raise PrepError("--sample-size must be positive")
    sampler = ReservoirSampler(sample_size, seed)
    documents = 0
    for text in texts:
        documents += 1
        for line in document_lines(text, max_chars):
            sampler.add(line)
    if not sampler.items:
        raise PrepError("no usable text found in the inputs to train a tokenizer on")
    return sampler, documents


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
    sampler, documents = sample_lines(texts, sample_size, seed, max_sentence_chars)
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


BYTELEVEL_EOD = "<|endoftext|>"  # GPT-2's end-of-document token, the default for byte-level BPE


def train_bytelevel_bpe(
    texts: Iterable[str],
    out_dir: str,
    *,
    vocab_size: int = 8192,
    sample_size: int = 300_000,
    seed: int = 1234,
    eod_piece: str = BYTELEVEL_EOD,
    special_tokens: tuple = (),
    min_frequency: int = 2,
    max_sentence_chars: int = 4096,
    extra_settings: Optional[dict] = None,
) -> dict:
    """Train a byte-level BPE `tokenizer.json` (GPT-2's pre-tokenization, no prefix space) on a seeded sample of
    lines; EOD is special token 0. Writes tokenizer.json, tokenizer_config.json and settings.json into `out_dir`.

    Deterministic: the same sample gives the same bytes (the trainer breaks count ties by the pair itself).
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [eod_piece, *(t for t in special_tokens if t != eod_piece)]
    if vocab_size < 256 + len(specials):
        raise PrepError(f"--vocab-size {vocab_size}: byte-level BPE needs at least 256 + {len(specials)} special "
                        f"tokens")
    out_dir = ensure_writable_dir(out_dir)
    t0 = time.time()
    sampler, documents = sample_lines(texts, sample_size, seed, max_sentence_chars)
    t_sample = time.time() - t0
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sampler.items, trainer=trainer, length=len(sampler.items))
    path = os.path.join(out_dir, HF_TOKENIZER_FILE)
    atomic_write_bytes(path, tok.to_str(pretty=True).encode("utf-8"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_piece,
              "clean_up_tokenization_spaces": False}
    atomic_write_json(os.path.join(out_dir, HF_TOKENIZER_CONFIG), config)
    loaded = load_tokenizer(path)
    settings = {
        "model": HF_TOKENIZER_FILE,
        "model_sha256": loaded.sha256,
        "tokenizers_version": tokenizers.__version__,
        "model_type": "bpe-bytelevel",
        "vocab_size": loaded.vocab_size,
        "min_frequency": min_frequency,
        "special_tokens": {t: tok.token_to_id(t) for t in specials},
        "eod": {"piece": eod_piece, "id": loaded.eod_id},
        "token_dtype": token_dtype_name(loaded.vocab_size),
        "sample": {"size": sample_size, "seed": seed, "lines_sampled": len(sampler.items),
                   "lines_seen": sampler.seen, "documents_seen": documents, "max_sentence_chars": max_sentence_chars},
        "seconds": {"sample": round(t_sample, 2), "total": round(time.time() - t0, 2)},
        **(extra_settings or {}),
    }
    atomic_write_json(os.path.join(out_dir, "settings.json"), settings)
    return settings


def read_settings(model_path: str) -> Optional[dict]:
    """The `<prefix>.json` written next to a model by `train_tokenizer`, if present."""
    path = os.path.splitext(model_path)[0] + ".json"
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None
