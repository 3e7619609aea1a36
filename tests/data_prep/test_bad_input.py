"""Bad input never crashes a run and is never dropped silently; argument errors stop before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_prep.cli import main
from data_prep.encode import EncodeOptions, run_encode
from tests.data_prep.helpers import expected_tokens, read_encode, write_jsonl

EOD = 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bad_corpus(tmp_path, docs):
    """(path, good texts in order, {line: reason}) with one of each kind of bad record between good ones."""
    big = ("word " * 7 + "\n") * 90_000  # ~3.2 MB: tokenized in pieces (piece_chars below)
    huge = "x" * 5_000_001  # over --max-doc-chars
    bad = [
        (b'{"text": "unterminated', "malformed_json"),
        (b"   ", "blank_line"),
        (b'["a", "list"]', "not_an_object"),
        (json.dumps({"body": "no text key"}).encode(), "missing_key"),
        (json.dumps({"text": None}).encode(), "not_a_string"),
        (json.dumps({"text": 42}).encode(), "not_a_string"),
        (b'{"text": "caf\xe9 latin-1 byte"}', "invalid_utf8"),
        (json.dumps({"text": ""}).encode(), "empty_document"),
        (json.dumps({"text": " \n\t  "}).encode(), "empty_document"),
        (b'{"text": "lone surrogate \\ud800 here"}', "invalid_unicode"),
        (json.dumps({"text": huge}).encode(), "too_long"),
    ]
    records, good, expected = [], [], {}
    for i, text in enumerate(docs[:30]):
        records.append(text)
        good.append(text)
        if i < len(bad):
            records.append(bad[i][0])
            expected[len(records)] = bad[i][1]
        if i == 20:
            records.append(big)
            good.append(big)
    return write_jsonl(str(tmp_path / "bad.jsonl"), records), good, expected


def test_every_kind_of_bad_record_is_counted_and_written(tmp_path, docs, tokenizer_model, sp):
    path, good, expected = _bad_corpus(tmp_path, docs)
    out = tmp_path / "out"
    manifest, status = run_encode(EncodeOptions(
        inputs=[path], tokenizer=tokenizer_model, out_dir=str(out), num_shards=3, workers=2, progress=False,
        max_doc_chars=5_000_000, piece_chars=100_000))
    assert status == 0
    # all good documents present, in order, exactly (the 3.2 MB one was encoded in pieces, stored whole)
    got = read_encode(str(out))["text"]
    assert len(got) == len(good)
    for text, tokens in zip(good, got):
        if len(text) > 100_000:
            assert sp.decode(tokens[:-1].tolist()) == text and tokens[-1] == EOD
        else:
            assert tokens.tolist() == expected_tokens(sp, text, EOD)
    assert manifest["long_documents"]["count"] == 1
    assert manifest["long_documents"]["longest_chars"] == len(good[21])
    # every reject: in the file with source and line, and in the counts
    with open(out / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    assert {r["line"]: r["reason"] for r in rejects} == expected
    assert all(r["source"] == path for r in rejects)
    by_reason = {}
    for reason in expected.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert manifest["rejects"]["by_reason"] == by_reason
    assert manifest["rejects"]["total"] == len(expected)
    assert manifest["records"] == manifest["inputs"][0]["records"] == len(good) + len(expected)


def test_strict_turns_rejects_into_an_exit_status(tmp_path, docs, tokenizer_model, capsys):
    path = write_jsonl(str(tmp_path / "in.jsonl"), docs[:5] + [b"{not json"])
    base = ["encode", "-i", path, "--tokenizer", tokenizer_model, "--workers", "1", "--no-progress"]
    assert main(base + ["--out-dir", str(tmp_path / "a")]) == 0
    assert main(base + ["--out-dir", str(tmp_path / "b"), "--strict"]) == 3
    captured = capsys.readouterr()
    assert "malformed_json 1" in captured.out
    assert "--strict" in captured.err
    clean = write_jsonl(str(tmp_path / "clean.jsonl"), docs[:5])
    assert main(["encode", "-i", clean, "--tokenizer", tokenizer_model, "--workers", "1", "--no-progress",
                 "--out-dir", str(tmp_path / "c"), "--strict"]) == 0


def test_tabular_bad_rows_are_rejected_with_row_numbers(tmp_path, tokenizer_model, sp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first row", None, "third row", "   ", "fifth row"]
    path = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2)
    manifest, _ = run_encode(EncodeOptions(inputs=[path], tokenizer=tokenizer_model, out_dir=str(tmp_path / "o"),
                                           num_shards=2, workers=1, progress=False, text_keys=["text", "title"]))
    got = read_encode(str(tmp_path / "o"))
    assert [g.tolist() for g in got["text"]] == [expected_tokens(sp, t, EOD) for t in texts if t and t.strip()]
    assert got["title"] == []
    with open(tmp_path / "o" / "rejects.jsonl") as f:
        rejects = sorted((r["row"], r["key"], r["reason"]) for r in map(json.loads, f))
    assert rejects == sorted([(1, "text", "not_a_string"), (3, "text", "empty_document")]
                             + [(i, "title", "missing_key") for i in range(5)])


def test_very_large_document_is_encoded_in_bounded_memory(tmp_path, tokenizer_model, sp):
    """A 20 MB document: encoded in 1 MB pieces, decodes back exactly; peak memory of the encode process
    tree stays far below what tokenizing it at once takes (~1 GB here)."""
    chunk = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(1000))
    big = (chunk * (20_000_000 // len(chunk) + 1))[:20_000_000]
    path = write_jsonl(str(tmp_path / "big.jsonl"), ["before", big, "after"])
    out = tmp_path / "out"
    probe = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([sys.executable, '-m', 'data_prep.cli', 'encode', '-i', {path!r}, '--tokenizer', "
        f"{tokenizer_model!r}, '--out-dir', {str(out)!r}, '--workers', '1', '--num-shards', '1', '--no-progress'])\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    code, maxrss_kb = res.stdout.strip().splitlines()[-1].split()
    assert code == "0", res.stderr
    assert int(maxrss_kb) < 350 * 1024, f"peak RSS {int(maxrss_kb) // 1024} MB"
    got = read_encode(str(out))["text"]
    assert len(got) == 3
    assert sp.decode(got[1][:-1].tolist()) == big
    assert got[0].tolist() == expected_tokens(sp, "before", EOD)
    assert got[2].tolist() == expected_tokens(sp, "after", EOD)
    with open(out / "manifest.json") as f:
        assert json.load(f)["long_documents"]["count"] == 1


def test_errors_come_before_any_work(tmp_path, docs, tokenizer_model, capsys):
    path = write_jsonl(str(tmp_path / "in.jsonl"), docs[:12])
    out = tmp_path / "out"
    # a missing input
    assert main(["encode", "-i", str(tmp_path / "nope.jsonl"), "--tokenizer", tokenizer_model,
                 "--out-dir", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err
    assert not out.exists()
    # an unreadable tokenizer
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    for tok in (str(garbage), str(tmp_path / "missing.model")):
        assert main(["encode", "-i", path, "--tokenizer", tok, "--out-dir", str(out)]) == 2
        assert "tokenizer" in capsys.readouterr().err
        assert not out.exists()
    # an output directory that cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert main(["encode", "-i", path, "--tokenizer", tokenizer_model, "--out-dir", str(blocker / "out")]) == 2
    assert "output directory" in capsys.readouterr().err
    # a different encode already in the directory
    base = ["encode", "-i", path, "--tokenizer", tokenizer_model, "--out-dir", str(out), "--no-progress",
            "--workers", "1"]
    assert main(base + ["--num-shards", "3"]) == 0
    assert (out / "data_00002.bin").exists()
    assert main(base + ["--num-shards", "2"]) == 2
    assert "num_shards: 3 -> 2" in capsys.readouterr().err
    assert main(base + ["--num-shards", "2", "--overwrite"]) == 0
    with open(out / "manifest.json") as f:
        shards = json.load(f)["datasets"]["text"]["shards"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".bin")) == [s + ".bin" for s in shards]
    assert shards == ["data_00000", "data_00001"]


@pytest.mark.parametrize("value", ["unsupported.txt", "hf:json:/no/such/*.jsonl"])
def test_unsupported_or_empty_inputs_are_errors(tmp_path, tokenizer_model, value, capsys):
    if value.endswith(".txt"):
        (tmp_path / value).write_text("plain text")
        value = str(tmp_path / value)
    assert main(["encode", "-i", value, "--tokenizer", tokenizer_model, "--out-dir", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err
