"""Kill `fpa-prep encode` with SIGKILL (whole process group) mid-run, re-run, get byte-identical output."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

from data_prep.encode import EncodeOptions, run_encode
from tests.data_prep.helpers import file_bytes, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARDS = 24


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, condition, timeout=120.0):
    """SIGKILL the process group as soon as condition() holds; True if it was killed while running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("condition never met")


def test_kill_and_resume_is_byte_identical(tmp_path, stdlib_docs, tokenizer_model):
    records = []
    for copy in range(6):
        for i, text in enumerate(stdlib_docs):
            records.append(f"copy {copy}\n" + text[:30_000])
            if i % 13 == 5:
                records.append(b'{"text": 1}')
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_encode(EncodeOptions(inputs=[path], tokenizer=tokenizer_model, out_dir=str(ref), num_shards=SHARDS,
                             workers=2, progress=False))
    args = ["encode", "-i", path, "--tokenizer", tokenizer_model, "--out-dir", str(out),
            "--num-shards", str(SHARDS), "--workers", "2"]
    committed = lambda: glob.glob(str(out / ".state" / "shard_*.json"))  # noqa: E731

    # 1) killed while the first shards are being written (temp files exist)
    assert _kill_when(_start(args), lambda: glob.glob(str(out / "*.bin.tmp")))
    assert len(committed()) < SHARDS
    # 2) killed again after a few shards were committed
    assert _kill_when(_start(args), lambda: len(committed()) >= 3)
    done = sorted(committed())
    assert 3 <= len(done) < SHARDS, len(done)
    kept = {}
    for state in done:
        index = state[-10:-5]
        for ext in (".bin", ".idx"):
            st = os.stat(out / f"data_{index}{ext}")
            kept[f"data_{index}{ext}"] = (st.st_ino, st.st_mtime_ns)
    # 3) the same command finishes the job, skipping what was committed
    proc = _start(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "resuming: skipping shards" in stderr
    for name, ident in kept.items():
        st = os.stat(out / name)
        assert (st.st_ino, st.st_mtime_ns) == ident, f"{name} was rewritten"
    a, b = file_bytes(str(ref)), file_bytes(str(out))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    assert any(name.endswith("rejects.jsonl") and a[name] for name in a)
