"""`fpa-prep synthetic mqar`: seeded and deterministic, solvable by lookup, queries at the requested distances,
and every GPTDataset training sample is exactly one whole sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.common import PrepError
from data_prep.synthetic import MQARSpec, make_mqar, recall_by_lookup

EOD = 255  # vocab 256: the last id


def _prep(tmp_path, name, *args):
    return prep_main(["synthetic", "mqar", "--out-dir", str(tmp_path), "--name", name, *args])


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert _prep(tmp_path, name, "--num-sequences", "50", "--seed", str(seed)) == 0
    read = {n: ((tmp_path / f"{n}.bin").read_bytes(), (tmp_path / f"{n}.idx").read_bytes()) for n in "abc"}
    assert read["a"] == read["b"]
    assert read["a"][0] != read["c"][0] and read["a"][1] == read["c"][1]  # same lengths, other tokens
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["seed"] == 5 and info["num_sequences"] == 50 and info["spec"]["seq_length"] == 64


def test_answers_recoverable_by_lookup():
    spec = MQARSpec(seq_length=64, num_pairs=4, vocab_size=256)
    tokens, positions = make_mqar(spec, 200, seed=3)
    assert tokens.shape == (200, 64) and positions.shape == (200, 4)
    for seq, pos in zip(tokens, positions):
        assert (seq[0:16:2] == EOD).all()  # E k E v per pair
        keys, values = seq[1:16:4], seq[3:16:4]
        assert len(set(keys.tolist())) == 4 and len(set(values.tolist())) == 4
        assert ((keys >= 0) & (keys < 127)).all() and ((values >= 127) & (values < 254)).all()
        solved = recall_by_lookup(seq, 4)
        assert [p for p, _, _ in solved] == sorted(pos.tolist())  # the queries found in the tokens are all of them
        for p, answer, distance in solved:
            assert seq[p + 1] == answer and seq[p + 2] == EOD  # the value stored with that key, then EOD
            i = keys.tolist().index(seq[p])
            assert distance == p - (4 * i + 1) == pos[i] - (4 * i + 1)
        assert {int(seq[p]) for p, _, _ in solved} == set(keys.tolist())  # every key asked once
        rest = np.ones(64, dtype=bool)
        rest[:16] = False  # the block; position 16 is always EOD
        rest[pos] = rest[pos + 1] = False
        assert (seq[rest] == EOD).all()
    # the queries spread over the whole allowed range
    distances = positions - np.array([1, 5, 9, 13])
    assert distances.min() == 4 and distances.max() >= 55 and spec.distance_bounds() == (4, 58)


@pytest.mark.parametrize("lo,hi", [(4, 40), (16, 45), (30, 58), (46, 58), (20, 24)])
def test_queries_at_requested_distances(lo, hi):
    spec = MQARSpec(seq_length=64, num_pairs=4, vocab_size=256, min_distance=lo, max_distance=hi)
    tokens, positions = make_mqar(spec, 100, seed=lo)
    for seq, pos in zip(tokens, positions):
        key_pos = {int(seq[1 + 4 * i]): 1 + 4 * i for i in range(4)}
        for p in pos:
            assert lo <= p - key_pos[int(seq[p])] <= hi
        assert all(lo <= d <= hi for _, _, d in recall_by_lookup(seq, 4))


def test_impossible_requests_are_errors(tmp_path, capsys):
    with pytest.raises(PrepError, match="allows distances 4 .. 58"):
        make_mqar(MQARSpec(min_distance=59), 1, seed=0)
    with pytest.raises(PrepError, match="too short"):
        make_mqar(MQARSpec(seq_length=27), 1, seed=0)
    assert _prep(tmp_path, "x", "--num-sequences", "3", "--num-pairs", "200") == 2
    assert "--num-pairs=200" in capsys.readouterr().err


def test_gpt_dataset_samples_are_whole_sequences(tmp_path):
    """What training sees: GPTDataset (shuffled) samples of seq_length + 1 tokens, each one whole sequence
    followed by the next one's leading EOD; with eod_mask_loss the loss covers the answers and the
    certain tokens (E after a block key or a query value), nothing else."""
    from fpa_megatron.data.datasets import build_gpt_datasets

    assert _prep(tmp_path, "mqar", "--num-sequences", "40", "--seq-length", "32", "--num-pairs", "3",
                 "--seed", "9") == 0
    tokens, _ = make_mqar(MQARSpec(seq_length=32, num_pairs=3), 40, seed=9)
    documents = {tuple(seq.tolist()) for seq in tokens}
    train, _, _ = build_gpt_datasets([str(tmp_path / "mqar")], None, "100,0,0", 32, 1, (100, 0, 0), None,
                                     str(tmp_path / "cache"), mock_vocab_size=256, eod_mask_loss=True)
    seen = set()
    for i in range(len(train)):
        sample = train[i]
        seq = sample["tokens"].numpy()
        assert tuple(seq.tolist()) in documents
        assert sample["labels"][-1] == EOD
        answers = {p for p, _, _ in recall_by_lookup(seq, 3)}
        trained = set(np.flatnonzero(sample["loss_mask"].numpy()).tolist())
        certain = {p for p in trained if sample["labels"][p] == EOD}
        assert trained == answers | certain and len(answers) == 3
        assert len(certain) == 9  # after each block key, block value and query value
        for p in answers:
            assert sample["labels"][p] == seq[p + 1]
        seen.add(tuple(seq.tolist()))
    assert len(seen) == 40  # the 100 samples cover every sequence (several epochs, reshuffled)
