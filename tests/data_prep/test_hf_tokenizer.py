"""`fpa-prep` with a Hugging Face tokenizer.json: byte-level BPE training, encode ids equal to the `tokenizers`
library's own encode, EOD from tokenizer_config.json / known tokens / --eod-piece, token dtype from the vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.cli import main
from data_prep.common import PrepError, sha256_file
from data_prep.tokenizer import load_tokenizer
from tests.data_prep.helpers import UNICODE_DOCS, encode, read_encode, write_jsonl
from tests.trained_runs import BPE_TEXTS


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, stdlib_docs) -> str:
    """A byte-level BPE tokenizer.json (vocabulary 500) trained by `fpa-prep tokenizer --type bpe-bytelevel`."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = write_jsonl(str(root / "in.jsonl"), stdlib_docs[:40] + UNICODE_DOCS)
    assert main(["tokenizer", "--type", "bpe-bytelevel", "-i", corpus, "--out", str(root / "tok"),
                 "--vocab-size", "500", "--sample-size", "5000", "--seed", "3"]) == 0
    return str(root / "tok")


def test_bytelevel_bpe_is_trained_deterministically_with_its_eod(bpe_dir, tmp_path, stdlib_docs):
    files = sorted(os.listdir(bpe_dir))
    assert files == ["settings.json", "tokenizer.json", "tokenizer_config.json"]
    settings = json.loads(open(os.path.join(bpe_dir, "settings.json")).read())
    library = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    assert settings["vocab_size"] == 500 == library.get_vocab_size()
    assert settings["eod"] == {"piece": "<|endoftext|>", "id": 0} and library.token_to_id("<|endoftext|>") == 0
    assert settings["model_sha256"] == sha256_file(os.path.join(bpe_dir, "tokenizer.json"))
    assert json.loads(open(os.path.join(bpe_dir, "tokenizer_config.json")).read())["eos_token"] == "<|endoftext|>"
    # same inputs and seed: the same bytes; another seed samples other lines and learns other merges
    corpus = write_jsonl(str(tmp_path / "in.jsonl"), stdlib_docs[:40] + UNICODE_DOCS)
    for name, seed in (("same", "3"), ("other", "4")):
        assert main(["tokenizer", "--type", "bpe-bytelevel", "-i", corpus, "--out", str(tmp_path / name),
                     "--vocab-size", "500", "--sample-size", "300", "--seed", seed]) == 0
    again = str(tmp_path / "again")
    assert main(["tokenizer", "--type", "bpe-bytelevel", "-i", corpus, "--out", again, "--vocab-size", "500",
                 "--sample-size", "300", "--seed", "3"]) == 0
    same = open(tmp_path / "same" / "tokenizer.json", "rb").read()
    assert open(os.path.join(again, "tokenizer.json"), "rb").read() == same
    assert open(tmp_path / "other" / "tokenizer.json", "rb").read() != same


def test_encode_equals_the_library_on_code_unicode_whitespace_and_unseen_bytes(bpe_dir, tmp_path, docs):
    library = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    every_char = "".join(chr(c) for c in range(1, 1200)) + "\U0001f600\U0010fffd"
    texts = [t for t in BPE_TEXTS if t.strip()] + docs + [every_char]
    path = write_jsonl(str(tmp_path / "in.jsonl"), texts)
    manifest = encode(tmp_path / "out", [path], bpe_dir, num_shards=2, workers=2)  # a directory as --tokenizer
    got = read_encode(str(tmp_path / "out"))["text"]
    assert len(got) == len(texts)
    for text, ids in zip(texts, got):
        assert ids.tolist() == library.encode(text).ids + [0], repr(text[:40])
        assert library.decode(ids[:-1].tolist(), skip_special_tokens=False) == text
    assert library.encode("text <|endoftext|> more").ids.count(0) == 1  # the library's rule: special tokens match
    assert manifest["tokenizer"]["kind"] == "huggingface" and manifest["tokenizer"]["eod_piece"] == "<|endoftext|>"
    assert manifest["tokenizer"]["sha256"] == sha256_file(os.path.join(bpe_dir, "tokenizer.json"))
    assert manifest["tokenizer"]["dtype"] == "uint16"
    # the file itself as --tokenizer: the same tokenizer (hash), the same encode
    manifest2 = encode(tmp_path / "out2", [path], os.path.join(bpe_dir, "tokenizer.json"), num_shards=2, workers=1)
    assert manifest2["fingerprint"] == manifest["fingerprint"]


def test_long_documents_encoded_in_pieces_equal_the_whole(bpe_dir, tmp_path, stdlib_docs):
    library = Tokenizer.from_file(os.path.join(bpe_dir, "tokenizer.json"))
    text = "".join(stdlib_docs[:8])[:20_000] + "  two  spaces \t\t tabs   " * 200
    path = write_jsonl(str(tmp_path / "in.jsonl"), [text])
    manifest = encode(tmp_path / "out", [path], bpe_dir, num_shards=1, workers=1, piece_chars=1000)
    assert manifest["long_documents"]["count"] == 1
    (ids,) = read_encode(str(tmp_path / "out"))["text"]
    assert ids.tolist() == library.encode(text).ids + [0]


def _tokenizer_file(directory, vocab: dict, specials=(), config=None) -> str:
    """A word-level tokenizer.json with `vocab` (and special tokens), plus a tokenizer_config.json if given."""
    from tokenizers import models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return path


def test_eod_comes_from_the_config_a_known_token_or_eod_piece(tmp_path, capsys):
    words = {w: i for i, w in enumerate(["<unk>", "a", "b", "c"])}
    # tokenizer_config.json's eos_token (an AddedToken dict, as transformers writes it) wins over known tokens
    configured = _tokenizer_file(tmp_path / "cfg", words, ["</s>", "<eot>"], {"eos_token": {"content": "<eot>"}})
    assert load_tokenizer(configured).eod_piece == "<eot>"
    assert load_tokenizer(configured, "</s>").eod_id == 4  # --eod-piece names another
    # no config: the first known end-of-text token the vocabulary has
    known = _tokenizer_file(tmp_path / "known", words, ["</s>"])
    assert (load_tokenizer(known).eod_piece, load_tokenizer(known).eod_id) == ("</s>", 4)
    # none: an error naming --eod-piece, before anything is written
    none = _tokenizer_file(tmp_path / "none", words, ["<sep>"])
    with pytest.raises(PrepError, match="no eos token.*--eod-piece"):
        load_tokenizer(none)
    inputs = write_jsonl(str(tmp_path / "in.jsonl"), ["a b c", "c b"])
    out = tmp_path / "out"
    assert main(["encode", "-i", inputs, "--tokenizer", none, "--out-dir", str(out), "--no-progress"]) == 2
    assert "--eod-piece" in capsys.readouterr().err and not out.exists()
    assert main(["encode", "-i", inputs, "--tokenizer", none, "--out-dir", str(out), "--no-progress",
                 "--eod-piece", "<nope>"]) == 2
    assert "'<nope>' (--eod-piece)" in capsys.readouterr().err and not out.exists()
    assert main(["encode", "-i", inputs, "--tokenizer", none, "--out-dir", str(out), "--no-progress",
                 "--eod-piece", "<sep>", "--workers", "1"]) == 0
    assert [d.tolist() for d in read_encode(str(out))["text"]] == [[1, 2, 3, 4], [3, 2, 4]]
    # inspect takes the tokenizer and its EOD from the manifest
    assert main(["inspect", str(out / "data_00000")]) == 0
    printed = capsys.readouterr().out
    assert "documents ending in EOD '<sep>': 2 of the first 2" in printed and "'a b c <sep>'" in printed  # word-level: tokens joined by spaces


def test_large_vocabulary_gives_int32_tokens(tmp_path):
    words = {f"w{i}": i for i in range(66_000)}
    path = _tokenizer_file(tmp_path / "big", words, ["<|endoftext|>"])
    inputs = write_jsonl(str(tmp_path / "in.jsonl"), ["w1 w65999 w65500", "w0 w2"])
    manifest = encode(tmp_path / "out", [inputs], path, num_shards=1, workers=1)
    assert manifest["tokenizer"]["dtype"] == "int32" and manifest["tokenizer"]["vocab_size"] == 66_001
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "out" / "data_00000")).index.dtype == np.int32
    got = read_encode(str(tmp_path / "out"))["text"]
    assert [d.tolist() for d in got] == [[1, 65999, 65500, 66000], [0, 2, 66000]]
