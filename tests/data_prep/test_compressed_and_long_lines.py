"""A cut .gz / .zst input is reported as truncated; compressed inputs are decompressed once per encode;
a JSON line over --max-line-bytes is rejected and read past in bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import tracemalloc
import zlib

import pytest

from data_prep.cli import main
from data_prep.readers import iter_records, resolve_inputs, scan_input
from tests.data_prep.helpers import expected_tokens, read_encode, write_jsonl

EOD = 2


def _compress_in_two_parts(kind: str, data: bytes) -> bytes:
    """Two gzip members / two zstd frames, as `cat a.gz b.gz` makes; the second zstd frame is written
    by a streaming compressor that ends a block every 4 KB (a cut block decodes to nothing)."""
    half = len(data) // 2
    if kind == "gz":
        return gzip.compress(data[:half]) + gzip.compress(data[half:])
    import zstandard

    out = [zstandard.ZstdCompressor(level=3).compress(data[:half])]
    stream = zstandard.ZstdCompressor(level=3).compressobj()
    for i in range(half, len(data), 4096):
        out += [stream.compress(data[i : i + 4096]), stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    out.append(stream.flush())
    return b"".join(out)


def _decodable_prefix(kind: str, cut: bytes) -> bytes:
    """What the compression library itself decodes from the cut file (the independent reference)."""
    if kind == "gz":
        out, rest = [], cut
        while rest:
            d = zlib.decompressobj(wbits=31)
            out.append(d.decompress(rest))
            rest = d.unused_data
        return b"".join(out)
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(cut), read_across_frames=True).read()


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_input_is_reported_and_strict_exits_3(kind, tmp_path, docs, tokenizer_model, sp, capsys):
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    whole = _compress_in_two_parts(kind, lines)
    cut = whole[: int(len(whole) * 0.7)]  # inside the second member / frame
    path = tmp_path / f"in.jsonl.{kind}"
    path.write_bytes(cut)
    prefix = _decodable_prefix(kind, cut)
    assert len(lines) // 2 < len(prefix) < len(lines) and lines.startswith(prefix)
    complete = prefix.count(b"\n")
    partial = len(prefix) > prefix.rfind(b"\n") + 1  # the cut falls inside a line

    out = tmp_path / "out"
    stale = out / ".decompressed-killed_run"  # what a killed run leaves behind: the next run removes it
    stale.mkdir(parents=True)
    (stale / "input_00000.jsonl").write_bytes(b"stale")
    status = main(["encode", "-i", str(path), "--tokenizer", tokenizer_model, "--out-dir", str(out),
                   "--num-shards", "3", "--workers", "1", "--no-progress", "--strict"])
    assert status == 3
    assert not [n for n in os.listdir(out) if n.startswith(".decompressed")]
    summary = capsys.readouterr().out
    assert f"TRUNCATED INPUT: {path} is truncated" in summary
    # single pass: the bytes decompressed by the scan and every shard together equal one decompression
    assert f"decompressed this run: {len(prefix):,} bytes" in summary

    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    unit = "gzip member" if kind == "gz" else "zstd frame"
    assert manifest["inputs"][0]["truncated"] == {"unit": unit, "decompressed_bytes": len(prefix),
                                                  "complete_lines": complete}
    assert manifest["rejects"]["by_reason"] == {"truncated_input": 1, **({"malformed_json": 1} if partial else {})}
    with open(out / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    assert rejects[0]["reason"] == "truncated_input" and rejects[0]["source"] == str(path)
    assert rejects[0]["decompressed_bytes"] == len(prefix) and rejects[0]["line"] == complete + 1
    assert [r["line"] for r in rejects[1:]] == ([complete + 1] if partial else [])
    # every complete record before the cut is encoded, exactly
    got = read_encode(str(out))["text"]
    assert [g.tolist() for g in got] == [expected_tokens(sp, d, EOD) for d in docs[:complete]]


def test_line_over_the_limit_is_rejected_and_the_rest_encoded(tmp_path, tokenizer_model, sp):
    limit = 20_000

    def line_of(n_bytes: int) -> str:  # a JSON line of exactly n_bytes before its newline
        return "word " * ((n_bytes - len('{"text": ""}')) // 5) + "x" * ((n_bytes - len('{"text": ""}')) % 5)

    at_limit, over_limit, huge = line_of(limit), line_of(limit + 1), line_of(300_000)
    assert len(json.dumps({"text": at_limit})) == limit and len(json.dumps({"text": over_limit})) == limit + 1
    records = [f"short document {i}" for i in range(12)]
    records[3:3] = [huge]
    records[9:9] = [at_limit, over_limit]
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    out = tmp_path / "out"
    assert main(["encode", "-i", path, "--tokenizer", tokenizer_model, "--out-dir", str(out), "--num-shards", "2",
                 "--workers", "1", "--no-progress", "--max-line-bytes", str(limit)]) == 0
    with open(out / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["line"], r["reason"]) for r in rejects] == [(4, "line_too_long"), (11, "line_too_long")]
    assert rejects[0]["detail"] == f"line too long (300,000 bytes > --max-line-bytes {limit:,})"
    assert rejects[1]["detail"] == f"line too long ({limit + 1:,} bytes > --max-line-bytes {limit:,})"
    assert rejects[0]["excerpt"].startswith('{"text": "word word')
    kept = [r for r in records if r not in (huge, over_limit)]
    got = read_encode(str(out))["text"]
    assert [g.tolist() for g in got] == [expected_tokens(sp, t, EOD) for t in kept]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_long_line_is_read_past_in_bounded_memory(tmp_path, suffix):
    """A 32 MB line with a 1 MB limit: Python allocations while reading it stay at a few MB."""
    big = b'{"text": "' + b"a" * (32 << 20) + b'"}\n'
    data = b'{"text": "before"}\n' + big + b'{"text": "after"}\n'
    path = tmp_path / f"in.jsonl{suffix}"
    path.write_bytes(gzip.compress(data, compresslevel=1) if suffix else data)
    info = scan_input(resolve_inputs([str(path)])[0])  # no decompressed copy: shards would decompress
    tracemalloc.start()
    try:
        got = [(loc, fields, bad and bad[0]) for loc, fields, bad in iter_records(info, 0, info.units, ["text"],
                                                                                  max_line_bytes=1 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [(1, {"text": "before"}, None), (2, None, "line_too_long"), (3, {"text": "after"}, None)]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
