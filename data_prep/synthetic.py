"""`fpa-prep synthetic mqar`: multi-query associative recall (Zoology's MQAR, Arora et al. 2023) as Megatron
indexed datasets, seeded and deterministic.

One sequence = one document of exactly `seq_length` tokens:

    position 0             BOS
    positions 1 .. 2n      k_1 v_1 k_2 v_2 ... k_n v_n      (n distinct keys, n distinct values)
    positions 2n+1 ..      FILLER, except n query pairs "k_i v_i" (every key once, in random order)

A model recalls when, reading a query key k_i at position p, it predicts v_i at p + 1: the value seen
next to the same key far earlier. The distance of a query is p minus the position of its key in the
key-value block; `min_distance` / `max_distance` restrict where queries go (held-out sets per distance
bucket). Query pairs start on the slots 2n+1, 2n+3, ... so they never overlap.

Why documents of exactly seq_length tokens: Megatron's GPTDataset cuts the (shuffled) concatenation of the
documents into samples of seq_length + 1 tokens that start every seq_length tokens, so every training
sample is then one whole sequence (its last label is the next sequence's BOS). The trainer's LM loss covers
every position (the random keys and values in the block are noise it cannot predict); the recall accuracy
is measured at the query positions only (`fpa_megatron/studies/recall.py`).

Vocabulary: BOS = 0, FILLER = 1, keys 2 .. 2 + K - 1, values after them (K = (vocab_size - 2) // 2).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.common import PrepError, atomic_write_json
from data_prep.indexed import NativeShardWriter

BOS, FILLER = 0, 1
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
    def num_keys(self) -> int:
        return (self.vocab_size - 2) // 2

    @property
    def key_range(self) -> tuple[int, int]:
        return 2, 2 + self.num_keys

    @property
    def value_range(self) -> tuple[int, int]:
        return 2 + self.num_keys, 2 + 2 * self.num_keys

    def key_position(self, i: int) -> int:
        return 1 + 2 * i

    def query_slots(self) -> np.ndarray:
        """Positions where a query pair (key at p, value at p + 1) may start."""
        return np.arange(2 * self.num_pairs + 1, self.seq_length - 1, 2)

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
                            f"{self.num_pairs} queries (needs >= {4 * self.num_pairs + 2})")
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
    seq = np.full(spec.seq_length, FILLER, dtype=np.int64)
    seq[0] = BOS
    seq[1:2 * spec.num_pairs + 1:2] = keys
    seq[2:2 * spec.num_pairs + 2:2] = values
    seq[positions] = keys
    seq[positions + 1] = values
    return seq, positions


def make_mqar(spec: MQARSpec, num_sequences: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[num_sequences, seq_length] tokens and [num_sequences, num_pairs] query positions; same seed, same data."""
    spec.validate()
    rng = np.random.default_rng(seed)
    pairs = [make_sequence(spec, rng) for _ in range(num_sequences)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def recall_by_lookup(seq: np.ndarray, num_pairs: int) -> list[tuple[int, int]]:
    """Solve a sequence from its tokens alone: [(query position p, the value of its key in the block)].

    Queries are the non-filler tokens after the block at even offsets from it; what a perfect model predicts
    at p (for p + 1) is the token after the same key in the key-value block.
    """
    block = {int(seq[1 + 2 * i]): int(seq[2 + 2 * i]) for i in range(num_pairs)}
    out = []
    for p in range(2 * num_pairs + 1, len(seq) - 1, 2):
        if seq[p] != FILLER:
            out.append((p, block[int(seq[p])]))
    return out


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
    key_pos = np.array([spec.key_position(i) for i in range(spec.num_pairs)])
    distances = positions - key_pos
    info = {
        "task": "mqar", "prefix": prefix, "seed": seed, "num_sequences": num_sequences, "spec": asdict(spec),
        "tokens": {"bos": BOS, "filler": FILLER, "keys": list(spec.key_range), "values": list(spec.value_range)},
        "distance_range": [int(distances.min()), int(distances.max())],
    }
    atomic_write_json(prefix + ".json", info)
    return info
