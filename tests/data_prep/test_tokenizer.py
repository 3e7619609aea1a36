"""`fpa-prep tokenizer`: options reach sentencepiece, settings JSON is written, sampling is seeded and uniform."""

from __future__ import annotations

import json
import os

import sentencepiece as spm

from data_prep.cli import main
from data_prep.common import sha256_file
from data_prep.tokenizer import ReservoirSampler
from tests.data_prep.helpers import UNICODE_DOCS, write_jsonl


def test_tokenizer_command_trains_with_the_given_settings(tmp_path, stdlib_docs):
    path = write_jsonl(str(tmp_path / "in.jsonl"), stdlib_docs[:30] + UNICODE_DOCS + [b"{bad json"])
    out = str(tmp_path / "tok" / "uni")
    assert main(["tokenizer", "-i", path, "--out", out, "--vocab-size", "700", "--model-type", "unigram",
                 "--sample-size", "4000", "--seed", "3", "--user-defined-symbols", "<|sep|>,<|img|>",
                 "--threads", "1"]) == 0
    with open(out + ".json") as f:
        settings = json.load(f)
    sp = spm.SentencePieceProcessor(model_file=out + ".model")
    assert os.path.isfile(out + ".vocab")
    assert settings["model_sha256"] == sha256_file(out + ".model")
    assert settings["model_type"] == "unigram" and settings["vocab_size"] == 700 == sp.vocab_size()
    assert settings["sample"]["size"] == 4000 and settings["sample"]["seed"] == 3
    assert settings["sample"]["lines_sampled"] == min(4000, settings["sample"]["lines_seen"])
    assert settings["sample"]["documents_seen"] == 30 + len(UNICODE_DOCS)
    assert settings["eod"] == {"piece": "</s>", "id": 2} and sp.eos_id() == 2 and sp.id_to_piece(2) == "</s>"
    assert settings["special_tokens"]["pad"]["id"] == 3 == sp.pad_id()
    assert settings["byte_fallback"] is True and settings["token_dtype"] == "uint16"
    # user-defined symbols stay whole; unseen characters round-trip through byte fallback
    ids = sp.encode("a <|sep|> b")
    assert sp.piece_to_id("<|sep|>") in ids
    for text in ["unseen: \U0001d518\U0001d52b\U0001d526 ☃", "  indented\n\tcode = 1\n"]:
        assert sp.decode(sp.encode(text)) == text
    # BPE and no byte fallback
    out2 = str(tmp_path / "tok" / "bpe")
    assert main(["tokenizer", "-i", path, "--out", out2, "--vocab-size", "500", "--model-type", "bpe",
                 "--no-byte-fallback", "--sample-size", "2000", "--threads", "1"]) == 0
    with open(out2 + ".json") as f:
        settings2 = json.load(f)
    assert settings2["model_type"] == "bpe" and settings2["byte_fallback"] is False
    sp2 = spm.SentencePieceProcessor(model_file=out2 + ".model")
    assert sp2.unk_id() in sp2.encode("\U0001d518")


def test_same_seed_same_tokenizer(tmp_path, stdlib_docs):
    path = write_jsonl(str(tmp_path / "in.jsonl"), stdlib_docs[:20])
    vocabs = []  # (the .model also stores its own path, so compare the learned pieces and scores)
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        out = str(tmp_path / name)
        assert main(["tokenizer", "-i", path, "--out", out, "--vocab-size", "400", "--sample-size", "500",
                     "--seed", seed, "--threads", "1"]) == 0
        with open(out + ".vocab", encoding="utf-8") as f:
            vocabs.append(f.read())
    assert vocabs[0] == vocabs[1]
    assert vocabs[0] != vocabs[2]


def test_reservoir_sample_is_uniform_and_seeded():
    def sample(seed, k=10, n=100):
        s = ReservoirSampler(k, seed)
        for i in range(n):
            s.add(i)
        return s.items

    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert sample(1, k=10, n=5) == [0, 1, 2, 3, 4]
    counts = [0] * 100
    trials = 3000
    for seed in range(trials):
        items = sample(seed)
        assert len(items) == len(set(items)) == 10
        for i in items:
            counts[i] += 1
    expected = trials * 10 / 100  # 300 each; binomial sd ~16
    assert all(abs(c - expected) < 80 for c in counts), (min(counts), max(counts))
    # the first and the last tenth are sampled alike (no bias toward the start of the stream)
    assert abs(sum(counts[:10]) - sum(counts[-10:])) < 200
