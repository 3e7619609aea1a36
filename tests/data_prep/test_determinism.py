"""Shards depend only on the input and the shard count; merged shards equal a single-shard encode."""

from __future__ import annotations

import json
import os
import random

import pytest

from data_prep import readers
from data_prep.cli import main
from data_prep.encode import plan_shards, split_points
from data_prep.merge import merge_encode_dir
from tests.data_prep.helpers import encode, expected_tokens, file_bytes, read_encode, write_jsonl

EOD = 2


def _corpus_with_rejects(tmp_path, stdlib_docs):
    records = []
    for i, text in enumerate(stdlib_docs):
        records.append(text[:30_000])  # no single line spanning several shards here
        if i % 17 == 3:
            records.append(b"{broken")
    return write_jsonl(str(tmp_path / "in.jsonl"), records)


def test_shards_do_not_depend_on_the_worker_count(tmp_path, stdlib_docs, tokenizer_model):
    path = _corpus_with_rejects(tmp_path, stdlib_docs)
    encode(tmp_path / "w1", [path], tokenizer_model, num_shards=5, workers=1)
    encode(tmp_path / "w2", [path], tokenizer_model, num_shards=5, workers=2)
    a, b = file_bytes(str(tmp_path / "w1")), file_bytes(str(tmp_path / "w2"))
    assert sorted(a) == sorted(b)
    assert sum(name.endswith(".bin") for name in a) == 5
    for name in a:
        assert a[name] == b[name], name


def test_merge_equals_encoding_into_one_shard(tmp_path, stdlib_docs, tokenizer_model):
    path = _corpus_with_rejects(tmp_path, stdlib_docs)
    encode(tmp_path / "one", [path], tokenizer_model, num_shards=1, workers=1)
    encode(tmp_path / "many", [path], tokenizer_model, num_shards=6, workers=2)
    assert main(["merge", str(tmp_path / "many")]) == 0
    for ext in (".bin", ".idx"):
        with open(tmp_path / "one" / ("data_00000" + ext), "rb") as a, open(tmp_path / "many" / ("data" + ext), "rb") as b:
            assert a.read() == b.read()
    # merging named prefixes in order gives the same bytes again
    with open(tmp_path / "many" / "manifest.json") as f:
        shards = [str(tmp_path / "many" / s) for s in json.load(f)["datasets"]["text"]["shards"]]
    assert main(["merge", *shards, "--output-prefix", str(tmp_path / "again")]) == 0
    with open(tmp_path / "again.bin", "rb") as a, open(tmp_path / "one" / "data_00000.bin", "rb") as b:
        assert a.read() == b.read()


def test_merge_refuses_an_incompleteencode(tmp_path, stdlib_docs, tokenizer_model):
    from data_prep.common import PrepError

    path = write_jsonl(str(tmp_path / "in.jsonl"), stdlib_docs[:10])
    encode(tmp_path / "o", [path], tokenizer_model, num_shards=2, workers=1)
    os.unlink(tmp_path / "o" / ".state" / "shard_00001.json")
    with open(tmp_path / "o" / "manifest.json") as f:
        manifest = json.load(f)
    manifest["status"] = "incomplete"
    with open(tmp_path / "o" / "manifest.json", "w") as f:
        json.dump(manifest, f)
    with pytest.raises(PrepError, match="not complete"):
        merge_encode_dir(str(tmp_path / "o"))


def test_plan_covers_every_unit_exactly_once():
    rng = random.Random(0)
    for _ in range(200):
        units = [rng.randint(0, 50) for _ in range(rng.randint(1, 6))]
        n = rng.randint(1, 12)
        plan = plan_shards(units, n)
        assert len(plan) == n
        covered = [[] for _ in units]
        for shard in plan:
            for i, a, b in shard:
                assert 0 <= a < b <= units[i]
                covered[i].append((a, b))
        for i, ranges in enumerate(covered):
            ranges.sort()
            pos = 0
            for a, b in ranges:
                assert a == pos
                pos = b
            assert pos == units[i]


def test_split_points_cover_text_at_word_boundaries():
    text = ("alpha beta  gamma " * 5000) + "x" * 3000
    pieces = split_points(text, 1000)
    assert "".join(text[a:b] for a, b in pieces) == text
    assert all(b - a <= 1000 for a, b in pieces)
    for a, _ in pieces[1:]:
        if text[a - 1] != "x":
            assert text[a] == " " and text[a - 1] != " "


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_line_numbers_are_exact_across_checkpoints_and_shards(tmp_path, tokenizer_model, sp, monkeypatch, suffix):
    """With a checkpoint every 512 bytes, 7 shards start mid-file; rejects still carry the exact line."""
    monkeypatch.setattr(readers, "CHECKPOINT_BYTES", 512)
    records, good, bad_lines = [], [], []
    rng = random.Random(3)
    for i in range(400):
        if rng.random() < 0.1:
            records.append(b'{"text": oops}')
            bad_lines.append(len(records))
        text = f"document {i} " + "lorem ipsum " * rng.randint(0, 30)
        records.append(text)
        good.append(text)
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    if suffix:
        import gzip

        with open(path, "rb") as f, gzip.open(path + suffix, "wb") as g:
            g.write(f.read())
        path += suffix
    manifest = encode(tmp_path / "o", [path], tokenizer_model, num_shards=7, workers=2)
    with open(tmp_path / "o" / "rejects.jsonl") as f:
        assert [json.loads(line)["line"] for line in f] == bad_lines
    got = read_encode(str(tmp_path / "o"))["text"]
    assert [g.tolist() for g in got] == [expected_tokens(sp, t, EOD) for t in good]
    assert manifest["inputs"][0]["records"] == len(records)
