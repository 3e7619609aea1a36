"""Recall accuracy of trained MQAR runs (`fpa-ablate recall`): load each run's final checkpoint in one process
and score it on held-out sequences, per key-to-query distance bucket.

A query counts as recalled when the model's most likely next token at the query key (over the whole
vocabulary) is the value stored with that key in the key-value block (`data_prep.synthetic.recall_by_lookup`
finds the queries, their answers and distances in the tokens). Each run gets `<run dir>/recall.json`:
{"buckets": {"dLO-HI": {"accuracy", "correct", "queries", "min_distance", "max_distance"}}, "overall": {...},
"checkpoint", "step"}.

    python -m fpa_megatron.studies.recall --test data/mqar/test --buckets 4-15 16-29 ... -- RUN_DIR [RUN_DIR ...]

Any training layout: the checkpoint is read offline (`checkpoint.reader`) into one TP1 x PP1 model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.quiet import quiet_optional_dependency_warnings
from data_prep.synthetic import recall_by_lookup
from fpa_megatron.checkpoint.reader import read_model_checkpoint, resolve_checkpoint_dir
from fpa_megatron.checkpoint.megatron_lm import megatron_lm
from fpa_megatron.studies.report import bucket_name

RESULT_FILE = "recall.json"


def query_table(tokens: np.ndarray, num_pairs: int) -> dict[str, np.ndarray]:
    """Every query of the [n, s] token array: its sequence (row), position, answer and distance."""
    found = [(i, *query) for i, seq in enumerate(tokens) for query in recall_by_lookup(seq, num_pairs)]
    columns = np.array(found, dtype=np.int64).reshape(-1, 4).T
    return dict(zip(("row", "position", "answer", "distance"), columns))


def read_sequences(prefix: str) -> np.ndarray:
    """All documents of an MQAR prefix as [n, seq_length] int64 (they all have the same length)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    out = np.stack([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    del ds
    return out


@torch.no_grad()
def recalled(model, tokens: np.ndarray, queries: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Per query (see `query_table`): whether `model` (called like a GPTModel: tokens, position ids, mask ->
    [b, s, vocab] logits) predicts its answer at its position, as a bool array."""
    predictions = np.empty(tokens.shape, dtype=np.int64)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start:start + batch_size])
        logits = model(batch, position_ids.expand(len(batch), -1), None)  # [b, s, vocab]
        predictions[start:start + len(batch)] = logits.argmax(-1).numpy()
    return predictions[queries["row"], queries["position"]] == queries["answer"]


def accuracy_by_bucket(hits: np.ndarray, distances: np.ndarray, buckets: list[tuple[int, int]]) -> dict:
    """{bucket name: accuracy, correct, queries, min/max distance seen} and "overall" for all queries."""
    out = {}
    for lo, hi in buckets + [(int(distances.min()), int(distances.max()))]:
        inside = (distances >= lo) & (distances <= hi)
        n = int(inside.sum())
        out[bucket_name(lo, hi)] = {
            "accuracy": float(hits[inside].mean()) if n else float("nan"), "correct": int(hits[inside].sum()),
            "queries": n, "min_distance": int(distances[inside].min()) if n else None,
            "max_distance": int(distances[inside].max()) if n else None}
    overall = out.pop(bucket_name(int(distances.min()), int(distances.max())))
    return {"buckets": out, "overall": overall}


def evaluate_run(run_dir: Path, test_prefix: str, buckets: list[tuple[int, int]], num_pairs: int) -> dict:
    """Score the run's newest complete checkpoint (any layout, read offline) on the held-out sequences, in this
    process; write and return its recall.json."""
    checkpoint = read_model_checkpoint(resolve_checkpoint_dir(run_dir))
    tokens = read_sequences(test_prefix)
    queries = query_table(tokens, num_pairs)
    with megatron_lm(checkpoint) as lm:
        hits = recalled(lambda batch, positions, mask: lm.logits(batch), tokens, queries)
    result = {"checkpoint": str(checkpoint.path), "step": checkpoint.step, "test": test_prefix,
              **accuracy_by_bucket(hits, queries["distance"], buckets)}
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, run_dir / RESULT_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    quiet_optional_dependency_warnings()
    parser = argparse.ArgumentParser(prog="python -m fpa_megatron.studies.recall", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories (with config.yaml and checkpoints/)")
    parser.add_argument("--test", required=True, help="prefix of the held-out MQAR sequences")
    parser.add_argument("--buckets", nargs="+", required=True, metavar="LO-HI", help="key-to-query distance buckets")
    parser.add_argument("--num-pairs", type=int, required=True)
    args = parser.parse_args(argv)
    buckets = [tuple(int(x) for x in item.split("-")) for item in args.buckets]
    for run_dir in args.run_dirs:
        result = evaluate_run(Path(run_dir), args.test, buckets, args.num_pairs)
        accuracies = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["buckets"].items())
        print(f"recall {run_dir}: {accuracies}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
