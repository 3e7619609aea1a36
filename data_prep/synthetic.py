"""`fpa-prep synthetic mqar`: multi-query associative recall (Zoology's MQAR, Arora et al. 2023) as Megatron
indexed datasets, seeded and deterministic.

One sequence = one document of exactly `seq_length` tokens (n = num_pairs, E = EOD):

    key-value block   E k_1 E v_1  E k_2 E v_2  ...  E k_n E v_n        (n distinct keys, n distinct values)
    then              E (filler), except n query triples "k_i v_i E"    (every key once, in random order)

A model recalls when, reading a query key k_i at position p, it predicts v_i at p + 1: the value that stood
two positions after the same key in the block. The distance of a query is p minus the position of its key
in the block; `min_distance` / `max_distance` restrict where queries go (held-out sets per distance
bucket). Query triples start on the slots 4n + 1, 4n + 4, ... so they never overlap and each ends with E.

How training sees it. Zoology trains on the answers only. Megatron's GPTDataset can leave positions out of
the loss in one way, `eod_mask_loss` (Megatron-LM's --eod-mask-loss, `data.eod_mask_loss: true`): no loss
where the input token is EOD. So EOD stands before every token that cannot be predicted (each key and value
of the block, every filler position): the loss then covers the answers (query key -> value) and tokens that
are certain (a block key or a query value is always followed by E). EOD is the last vocabulary id, which
is the trainer's EOD when no tokenizer is configured (vocab_size - 1). Documents have exactly seq_length
tokens because GPTDataset cuts the shuffled concatenation of the documents into samples of seq_length + 1
tokens every seq_length tokens: every training sample is one whole sequence (its last label is the next
sequence's leading E, whose input is a filler E: no loss). Accuracy is measured at the query positions only
(`fpa_megatron/studies/recall.py`).

Vocabulary: keys 0 .. K - 1, values K .. 2K - 1 (K = (vocab_size - 1) // 2), EOD = vocab_size - 1.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.common import PrepError, atomic_write_json
from data_prep.indexed import NativeShardWriter

PLACEMENT_ATTEMPTS = 100  # random restarts of one sequence's query placement before giving up


@dataclass(frozen=True)
class MQARSpec:
    """The shape of an MQAR dataset."""

    seq_length: int = 64
    num_pairs: int = 4
    vocab_size: int = 256
    min_distance: int = 1  # key position to query position, inclusive bounds
    max_distance: int = 1_000_000

    @property
    def eod(self) -> int:
        return self.vocab_size - 1

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def key_range(self) -> tuple[int, int]:
        return 0, self.num_keys

    @property
    def value_range(self) -> tuple[int, int]:
        return self.num_keys, 2 * self.num_keys

    def key_position(self, i: int) -> int:
        return 4 * i + 1

    def value_position(self, i: int) -> int:
        return 4 * i + 3

    def query_slots(self) -> np.ndarray:
        """Positions where a query triple (key at p, value at p + 1, EOD at p + 2) may start: after the block
        and one EOD (so the block's last value is followed by EOD, a certain token)."""
        return np.arange(4 * self.num_pairs + 1, self.seq_length - 2, 3)

    def distance_bounds(self) -> tuple[int, int]:
        """The smallest and largest key-to-query distance this layout allows."""
        slots = self.query_slots()
        return int(slots[0] - self.key_position(self.num_pairs - 1)), int(slots[-1] - self.key_position(0))

    def validate(self) -> None:
        if self.num_pairs < 1:
            raise PrepError(f"--num-pairs={self.num_pairs} must be >= 1")
        if self.num_keys < self.num_pairs:
            raise PrepError(f"--vocab-size={self.vocab_size} leaves {self.num_keys} keys: fewer than "
                            f"--num-pairs={self.num_pairs}")
        if len(self.query_slots()) < self.num_pairs:
            raise PrepError(f"--seq-length={self.seq_length} is too short for {self.num_pairs} key-value pairs and "
                            f"{self.num_pairs} queries (needs >= {7 * self.num_pairs + 1})")
        lo, hi = self.distance_bounds()
        if self.min_distance > self.max_distance or self.max_distance < lo or self.min_distance > hi:
            raise PrepError(f"--min-distance={self.min_distance} --max-distance={self.max_distance}: this layout "
                            f"allows distances {lo} .. {hi}")


def _place_queries(spec: MQARSpec, rng: np.random.Generator) -> np.ndarray | None:
    """query_pos[i] for every key i, each on a free slot within the distance bounds; None if stuck."""
    slots = spec.query_slots()
    free = np.ones(len(slots), dtype=bool)
    positions = np.zeros(spec.num_pairs, dtype=np.int64)
    for i in rng.permutation(spec.num_pairs):
        distance = slots - spec.key_position(int(i))
        allowed = np.flatnonzero(free & (distance >= spec.min_distance) & (distance <= spec.max_distance))
        if len(allowed) == 0:
            return None
        pick = int(rng.choice(allowed))
        free[pick] = False
        positions[i] = slots[pick]
    return positions


def make_sequence(spec: MQARSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sequence [seq_length] and its query positions [num_pairs] (query i asks for key i)."""
    for _ in range(PLACEMENT_ATTEMPTS):
        positions = _place_queries(spec, rng)
        if positions is not None:
            break
    else:
        raise PrepError(f"could not place {spec.num_pairs} queries at distances {spec.min_distance} .. "
                        f"{spec.max_distance} in {PLACEMENT_ATTEMPTS} attempts: widen the range")
    keys = rng.choice(np.arange(*spec.key_range), size=spec.num_pairs, replace=False)
    values = rng.choice(np.arange(*spec.value_range), size=spec.num_pairs, replace=False)
    seq = np.full(spec.seq_length, spec.eod, dtype=np.int64)
    block = np.arange(spec.num_pairs)
    seq[spec.key_position(block)] = keys
    seq[spec.value_position(block)] = values
    seq[positions] = keys
    seq[positions + 1] = values
    return seq, positions


def make_mqar(spec: MQARSpec, num_sequences: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_sequences, seq_length] tokens and [num_sequences, num_pairs] query positions; same seed, same data."""
    spec.validate()
    rng = np.random.default_rng(seed)
    pairs = [make_sequence(spec, rng) for _ in range(num_sequences)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def recall_by_lookup(seq: np.ndarray, num_pairs: int) -> list[tuple[int, int, int]]:
    """Solve a sequence from its tokens alone: [(query position p, the answer, the key-to-query distance)].

    The block is the first 4 n tokens (E k E v per pair); a query is a non-EOD token on a query slot; what a
    perfect model predicts at p (for p + 1) is the value stored with the same key in the block.
    """
    eod = int(seq[0])
    block = {int(seq[4 * i + 1]): (int(seq[4 * i + 3]), 4 * i + 1) for i in range(num_pairs)}
    found = []
    for p in range(4 * num_pairs + 1, len(seq) - 2, 3):
        if seq[p] != eod:
            answer, key_position = block[int(seq[p])]
            found.append((p, answer, p - key_position))
    return found


def write_mqar(out_dir: str, name: str, spec: MQARSpec, num_sequences: int, seed: int) -> dict:
    """`<out_dir>/<name>.bin/.idx` (one document per sequence) and `<name>.json` (spec, seed, distances).

    Returns what it wrote. Rewrites the files if they exist (the output depends only on the arguments).
    """
    if num_sequences < 1:
        raise PrepError(f"--num-sequences={num_sequences} must be >= 1")
    tokens, positions = make_mqar(spec, num_sequences, seed)
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, name)
    writer = NativeShardWriter(prefix + ".bin", "uint16" if spec.vocab_size <= 65536 else "int32")
    for seq in tokens:
        writer.add_document(seq.astype(writer.dtype))
    writer.finalize(prefix + ".idx")
    distances = positions - spec.key_position(np.arange(spec.num_pairs))
    info = {
        "task": "mqar", "prefix": prefix, "seed": seed, "num_sequences": num_sequences, "spec": asdict(spec),
        "tokens": {"eod": spec.eod, "keys": list(spec.key_range), "values": list(spec.value_range)},
        "distance_range": [int(distances.min()), int(distances.max())],
    }
    atomic_write_json(prefix + ".json", info)
    return info
