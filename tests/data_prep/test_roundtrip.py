"""Round trips: encode, read back with Megatron-core's IndexedDataset, compare with sentencepiece directly."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_prep.indexed import DTYPE_CODES
from data_prep.tokenizer import token_dtype_name, train_tokenizer
from tests.data_prep.helpers import encode, expected_tokens, read_documents, read_encode, write_jsonl

EOD = 2


def test_roundtrip_jsonl(tmp_path, docs, tokenizer_model, sp):
    path = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    manifest = encode(tmp_path / "out", [path], tokenizer_model, num_shards=3, workers=2)
    got = read_encode(str(tmp_path / "out"))["text"]
    assert len(got) == len(docs)
    for text, tokens in zip(docs, got):
        assert tokens.tolist() == expected_tokens(sp, text, EOD)
        assert sp.decode(tokens[:-1].tolist()) == text
    total = sum(len(t) for t in got)
    assert manifest["status"] == "complete"
    assert manifest["datasets"]["text"]["documents"] == len(docs)
    assert manifest["datasets"]["text"]["tokens"] == total
    assert manifest["rejects"]["total"] == 0
    assert manifest["inputs"][0]["records"] == len(docs)
    assert manifest["tokenizer"]["dtype"] == "uint16"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out" / "data_00000"))
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(ds.document_indices) - 1  # one sequence per document


def test_native_writer_is_byte_identical_to_megatron_builder(tmp_path, docs, tokenizer_model, sp):
    """The default writer and --index-writer megatron both equal IndexedDatasetBuilder fed the same tokens."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    path = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=np.uint16)
    for text in docs:
        builder.add_item(torch.tensor(expected_tokens(sp, text, EOD)))
        builder.end_document()
    builder.finalize(ref + ".idx")
    for writer in ("native", "megatron"):
        out = tmp_path / writer
        encode(out, [path], tokenizer_model, num_shards=1, workers=1, index_writer=writer)
        for ext in (".bin", ".idx"):
            with open(out / ("data_00000" + ext), "rb") as a, open(ref + ext, "rb") as b:
                assert a.read() == b.read(), (writer, ext)


def test_dtype_rule_and_codes_match_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (256, 8192, 65499, 65500, 70000, 250000):
        assert token_dtype_name(vocab) == DType.optimal_dtype(vocab).__name__
    for name, code in DTYPE_CODES.items():
        assert DType.code_from_dtype(getattr(np, name)) == code


def test_large_vocabulary_gives_int32_tokens(tmp_path, stdlib_docs):
    """A vocabulary >= 65500 is stored as int32 and still round-trips."""
    import sentencepiece as spm

    prefix = str(tmp_path / "big")
    symbols = tuple(f"<s{i}>" for i in range(65600))
    train_tokenizer(stdlib_docs[:40], prefix, vocab_size=66000, sample_size=20_000, seed=1,
                    user_defined_symbols=symbols, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.vocab_size() == 66000
    texts = ["hello <s65599> world", "plain text", "<s70000> is not a symbol"]
    path = write_jsonl(str(tmp_path / "in.jsonl"), texts)
    manifest = encode(tmp_path / "out", [path], prefix + ".model", num_shards=1, workers=1)
    assert manifest["tokenizer"]["dtype"] == "int32"
    got = read_documents(str(tmp_path / "out" / "data_00000"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "out" / "data_00000")).index.dtype == np.int32
    assert [g.tolist() for g in got] == [expected_tokens(sp, t, sp.eos_id()) for t in texts]
    assert max(got[0]) >= 65500


def _write_format(kind: str, tmp_path, docs: list[str]) -> tuple[str, dict]:
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    if kind == "jsonl.gz":
        path = str(tmp_path / "in.jsonl.gz")
        with gzip.open(path, "wb") as f:
            f.write(lines[: len(lines) // 2])
        with gzip.open(path, "ab") as f:  # a second gzip member, as `cat a.gz b.gz` makes
            f.write(lines[len(lines) // 2 :])
        return path, {}
    if kind == "jsonl.zst":
        import zstandard

        path = str(tmp_path / "in.jsonl.zst")
        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(lines))
        return path, {}
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = str(tmp_path / "in.parquet")
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
        return path, {}
    import datasets

    if kind == "hf_disk":
        path = str(tmp_path / "hf")
        datasets.DatasetDict({
            "train": datasets.Dataset.from_dict({"text": docs}),
            "validation": datasets.Dataset.from_dict({"text": ["not this split"]}),
        }).save_to_disk(path)
        return path, {"hf_split": "train"}
    if kind == "hf_load":
        path = str(tmp_path / "raw.jsonl")
        with open(path, "wb") as f:
            f.write(lines)
        return f"hf:json:{path}", {"hf_cache_dir": str(tmp_path / "hf_cache")}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "hf_disk", "hf_load"])
def test_input_formats_roundtrip(kind, tmp_path, docs, tokenizer_model, sp, capsys):
    path, extra = _write_format(kind, tmp_path, docs)
    manifest = encode(tmp_path / "out", [path], tokenizer_model, num_shards=3, workers=2, **extra)
    got = read_encode(str(tmp_path / "out"))["text"]
    assert [g.tolist() for g in got] == [expected_tokens(sp, d, EOD) for d in docs]
    assert manifest["inputs"][0]["records"] == len(docs)
    assert manifest["rejects"]["total"] == 0
    if kind.startswith("jsonl."):  # decompressed once for the whole encode (scan and 3 shards together)
        size = len("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8"))
        assert f"decompressed this run: {size:,} bytes" in capsys.readouterr().out
        assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".decompressed")]  # copy removed
    if kind == "hf_load":
        assert os.listdir(tmp_path / "hf_cache")  # the Arrow cache went where we asked


def test_several_text_keys_are_separate_datasets(tmp_path, tokenizer_model, sp):
    records = [{"text": f"body number {i} " * (i + 1), "title": f"Title {i}"} for i in range(12)]
    del records[4]["title"]
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    manifest = encode(tmp_path / "out", [path], tokenizer_model, num_shards=2, workers=2, text_keys=["text", "title"])
    assert sorted(manifest["datasets"]) == ["text", "title"]
    assert manifest["datasets"]["title"]["shards"] == ["data_title_00000", "data_title_00001"]
    got = read_encode(str(tmp_path / "out"))
    assert [sp.decode(t[:-1].tolist()) for t in got["text"]] == [r["text"] for r in records]
    assert [sp.decode(t[:-1].tolist()) for t in got["title"]] == [r["title"] for r in records if "title" in r]
    with open(tmp_path / "out" / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["line"], r["key"], r["reason"]) for r in rejects] == [(5, "title", "missing_key")]


def test_several_inputs_are_read_in_order(tmp_path, docs, tokenizer_model, sp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = write_jsonl(str(tmp_path / "a.jsonl"), docs[:20])
    second = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": docs[20:40]}), second, row_group_size=6)
    third = write_jsonl(str(tmp_path / "c.jsonl"), docs[40:])
    manifest = encode(tmp_path / "out", [first, second, third], tokenizer_model, num_shards=4, workers=2)
    got = read_encode(str(tmp_path / "out"))["text"]
    assert [g.tolist() for g in got] == [expected_tokens(sp, d, EOD) for d in docs]
    assert [i["records"] for i in manifest["inputs"]] == [20, 20, len(docs) - 40]


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_documents_in_pieces_decode_exactly(tmp_path, stdlib_docs, dummy_prefix):
    """Pieces are cut before a space; with a dummy-prefix model that space is left to the dummy prefix."""
    import sentencepiece as spm

    prefix = str(tmp_path / "tok")
    train_tokenizer(stdlib_docs[:30], prefix, vocab_size=600, sample_size=20_000, seed=2, num_threads=1,
                    add_dummy_prefix=dummy_prefix)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    text = "".join(stdlib_docs[:10])[:60_000].lstrip()
    assert sp.decode(sp.encode(text)) == text
    path = write_jsonl(str(tmp_path / "in.jsonl"), [text])
    manifest = encode(tmp_path / "out", [path], prefix + ".model", num_shards=1, workers=1, piece_chars=1000)
    assert manifest["long_documents"]["count"] == 1
    (tokens,) = read_documents(str(tmp_path / "out" / "data_00000"))
    assert sp.decode(tokens[:-1].tolist()) == text
    # cutting at word boundaries keeps the tokens almost those of the whole document
    whole = sp.encode(text)
    assert abs(len(tokens) - 1 - len(whole)) <= len(text) // 1000
