"""`fpa-prep merge` (a file copy plus a numpy index) against Megatron-core's own IndexedDatasetBuilder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.common import PrepError
from data_prep.merge import merge_prefixes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# documents per shard; None is a shard with no document at all; a document may span several sequences
SHARD_DOCS = [None, 7, 1, None, 12, 3]


def _write_shards(directory, dtype, seed: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """Shards written by IndexedDatasetBuilder (the reference writer) from random tokens.

    Returns the prefixes and, per shard, its sequences in order (the independent expectation)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    high = 65_000 if dtype == np.uint16 else 2_000_000
    prefixes, contents = [], []
    for k, n_docs in enumerate(SHARD_DOCS):
        prefix = str(directory / f"{np.dtype(dtype).name}_{k:02d}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        sequences = []
        for _ in range(n_docs or 0):
            for _ in range(int(rng.integers(1, 4))):  # 1-3 sequences in this document
                seq = rng.integers(0, high, size=int(rng.integers(1, 300)))
                builder.add_item(torch.from_numpy(seq))
                sequences.append(seq)
            builder.end_document()
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
        contents.append(sequences)
    return prefixes, contents


def _megatron_merge(prefixes: list[str], out: str, dtype) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(out + ".bin", dtype=dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(out + ".idx")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """{dtype name: (prefixes, sequences per shard, Megatron-merged reference prefix)}."""
    out = {}
    for dtype in (np.uint16, np.int32):
        directory = tmp_path_factory.mktemp(np.dtype(dtype).name)
        prefixes, contents = _write_shards(directory, dtype, seed=len(out))
        reference = str(directory / "megatron_merged")
        _megatron_merge(prefixes, reference, dtype)
        out[np.dtype(dtype).name] = (prefixes, contents, reference)
    return out


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_merge_is_byte_identical_to_megatron_builder(dtype, shards, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, contents, reference = shards[dtype]
    out = str(tmp_path / "merged")
    result = merge_prefixes(prefixes, out)
    for ext in (".bin", ".idx"):
        assert _read(out + ext) == _read(reference + ext), ext
    # read back with Megatron's reader: the sequences of every shard, in order, and the document count
    sequences = [s for shard in contents for s in shard]
    ds = IndexedDataset(out)
    assert ds.index.dtype == np.dtype(dtype)
    assert len(ds) == len(sequences)
    for i, seq in enumerate(sequences):
        assert ds[i].tolist() == seq.tolist()
    assert len(ds.document_indices) - 1 == sum(n or 0 for n in SHARD_DOCS) == result["documents"]
    assert result["sequences"] == len(sequences)
    assert result["tokens"] == sum(len(s) for s in sequences)
    assert result["bytes"] == os.path.getsize(out + ".bin") + os.path.getsize(out + ".idx")


def test_mixed_dtypes_are_refused_naming_each_file(shards, tmp_path):
    mixed = [shards["uint16"][0][1], shards["int32"][0][2]]
    with pytest.raises(PrepError, match="different token dtypes") as err:
        merge_prefixes(mixed, str(tmp_path / "m"))
    assert f"{mixed[0]}.idx: uint16" in str(err.value) and f"{mixed[1]}.idx: int32" in str(err.value)
    assert not os.listdir(tmp_path)


def test_damaged_inputs_are_named(shards, tmp_path):
    good = shards["uint16"][0][1]
    cases = {
        "bad_magic": (b"NOTANIDX!" + _read(good + ".idx")[9:], _read(good + ".bin"), "bad or missing header"),
        "short_idx": (_read(good + ".idx")[:-8], _read(good + ".bin"), "is truncated"),
        "short_bin": (_read(good + ".idx"), _read(good + ".bin")[:-2], "do not belong together"),
    }
    for name, (idx, binary, message) in cases.items():
        prefix = str(tmp_path / name)
        with open(prefix + ".idx", "wb") as f:
            f.write(idx)
        with open(prefix + ".bin", "wb") as f:
            f.write(binary)
        with pytest.raises(PrepError, match=message) as err:
            merge_prefixes([good, prefix], str(tmp_path / "out"))
        assert prefix in str(err.value)
    assert not any(n.startswith("out") for n in os.listdir(tmp_path))


def test_merge_cli_does_not_import_megatron_and_prints_mb_per_s(shards, tmp_path):
    """The CLI in a fresh interpreter: same bytes as Megatron's builder, and neither megatron nor torch loaded."""
    prefixes, _, reference = shards["int32"]
    out = str(tmp_path / "cli_merged")
    probe = (
        "import sys\n"
        "from data_prep.cli import main\n"
        f"code = main(['merge', *{prefixes!r}, '--output-prefix', {out!r}])\n"
        "print('exit', code, 'megatron' in sys.modules, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary, last = res.stdout.strip().splitlines()
    assert last == "exit 0 False False"
    assert f"merged {len(prefixes)} dataset(s) -> {out}:" in summary and "MB/s)" in summary
    for ext in (".bin", ".idx"):
        assert _read(out + ext) == _read(reference + ext), ext
