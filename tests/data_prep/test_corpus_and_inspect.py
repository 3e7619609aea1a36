"""The built-in stdlib corpus, `inspect`, and a GPTDataset over `encode` output."""

from __future__ import annotations

import json

import numpy as np

from data_prep.builtin_corpus import write_corpus
from data_prep.cli import main
from data_prep.encode import EncodeOptions, run_encode
from tests.data_prep.helpers import write_jsonl


def test_builtin_corpus_is_deterministic_and_sized(tmp_path):
    a = write_corpus(str(tmp_path / "a"), max_mb=0.5)
    b = write_corpus(str(tmp_path / "b"), max_mb=0.5)
    assert a["sha256"] == b["sha256"] and a["documents"] == b["documents"]
    assert 0.5 * (1 << 20) <= a["bytes"] < 2 * (1 << 20)
    assert a["documents_by_kind"]["source"] > 0 and a["documents_by_kind"]["docstrings"] > 0
    with open(tmp_path / "a" / "stdlib.jsonl") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == a["documents"]
    assert all(d["text"].strip() and d["path"].endswith(".py") for d in docs)
    assert not any("/test" in d["path"] or d["path"].startswith("test") for d in docs)
    src = next(d for d in docs if d["kind"] == "source")
    import sysconfig

    with open(f"{sysconfig.get_paths()['stdlib']}/{src['path']}", encoding="utf-8") as f:
        assert f.read() == src["text"]


def test_inspect_prints_counts_and_decoded_text(tmp_path, docs, tokenizer_model, capsys):
    path = write_jsonl(str(tmp_path / "in.jsonl"), docs[:8])
    run_encode(EncodeOptions(inputs=[path], tokenizer=tokenizer_model, out_dir=str(tmp_path / "o"),
                             num_shards=1, workers=1, progress=False))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "o" / "data_00000"), "--docs", "2", "--tokens", "400"]) == 0
    out = capsys.readouterr().out
    assert "documents: 8" in out and "dtype:     uint16" in out
    assert "documents ending in EOD '</s>': 8 of the first 8" in out
    assert repr(docs[0][:40])[1:-1] in out  # decoded start of the first document (found via the manifest)


def test_gpt_dataset_over_encode_output_yields_configured_length(tmp_path, stdlib_docs, tokenizer_model, sp):
    """Megatron's builder + GPTDataset over the merged output: samples are seq_length tokens of real text."""
    from fpa_megatron.data.datasets import build_gpt_datasets

    path = write_jsonl(str(tmp_path / "in.jsonl"), stdlib_docs)
    run_encode(EncodeOptions(inputs=[path], tokenizer=tokenizer_model, out_dir=str(tmp_path / "o"),
                             num_shards=4, workers=2, progress=False))
    assert main(["merge", str(tmp_path / "o")]) == 0
    prefix = str(tmp_path / "o" / "data")
    train, valid, test = build_gpt_datasets([prefix], None, "90,5,5", 96, 11, (300, 20, 20), tokenizer_model,
                                            str(tmp_path / "cache"))
    corpus_tokens = set()
    for text in stdlib_docs:
        corpus_tokens.update(sp.encode(text))
    for ds in (train, valid, test):
        assert len(ds) >= 20
        for i in range(0, len(ds), max(1, len(ds) // 25)):
            s = ds[i]
            assert s["tokens"].shape == (96,) and s["labels"].shape == (96,)
            assert s["loss_mask"].shape == (96,) and s["position_ids"].tolist() == list(range(96))
            assert np.array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())
            assert set(s["tokens"].tolist()) <= corpus_tokens | {2}


def test_demo_pipeline_through_the_cli(tmp_path, capsys):
    """corpus -> tokenizer -> encode -> merge -> inspect, as the README runs it (smaller sizes)."""
    raw, tok, enc = tmp_path / "raw", tmp_path / "tok" / "stdlib", tmp_path / "enc"
    assert main(["corpus", "--out", str(raw), "--max-mb", "0.3"]) == 0
    assert main(["tokenizer", "-i", str(raw / "stdlib.jsonl"), "--out", str(tok), "--vocab-size", "1024",
                 "--sample-size", "20000", "--seed", "1234"]) == 0
    assert main(["encode", "-i", str(raw / "stdlib.jsonl"), "--tokenizer", f"{tok}.model", "--out-dir", str(enc),
                 "--name", "stdlib", "--workers", "2", "--no-progress"]) == 0
    assert main(["merge", str(enc)]) == 0
    assert main(["inspect", str(enc / "stdlib")]) == 0
    out = capsys.readouterr().out
    with open(raw / "stdlib.json") as f:
        n_docs = json.load(f)["documents"]
    assert f"documents: {n_docs:,}" in out
    assert f"documents ending in EOD '</s>': {n_docs:,}" in out
