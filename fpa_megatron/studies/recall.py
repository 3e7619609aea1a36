"""Recall accuracy of trained MQAR runs (`fpa-ablate recall`): load each run's final checkpoint in one process
and score it on held-out sequences, per key-to-query distance bucket.

A query counts as recalled when the model's most likely next token at the query key (over the whole
vocabulary) is the value stored with that key in the key-value block (`data_prep.synthetic.recall_by_lookup`
finds the queries, their answers and distances in the tokens). Each run gets `<run dir>/recall.json`:
{"buckets": {"dLO-HI": {"accuracy", "correct", "queries", "min_distance", "max_distance"}}, "overall": {...},
"checkpoint", "step"}.

    python -m fpa_megatron.studies.recall --test data/mqar/test --buckets 4-15 16-29 ... -- RUN_DIR [RUN_DIR ...]

Runs trained with one model-parallel rank (TP1 x PP1, any DP): the checkpoint's `mp_rank_00_model_states.pt`
holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fpa_megatron.quiet import quiet_optional_dependency_warnings

RESULT_FILE = "recall.json"


def query_table(tokens: np.ndarray, num_pairs: int) -> dict[str, np.ndarray]:
    """Every query of the [n, s] token array: its sequence (row), position, answer and distance."""
    from data_prep.synthetic import recall_by_lookup

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
    """Per query (see `query_table`): whether `model` (a TP1 x PP1 GPTModel, or anything called like one)
    predicts its answer at its position, as a bool array."""
    model.eval()
    predictions = np.empty(tokens.shape, dtype=np.int64)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start:start + batch_size])
        logits = model(batch, position_ids.expand(len(batch), -1), None)  # [b, s, vocab]
        predictions[start:start + len(batch)] = logits.argmax(-1).numpy()
    return predictions[queries["row"], queries["position"]] == queries["answer"]


def bucket_name(lo: int, hi: int) -> str:
    return f"d{lo:02d}-{hi:02d}"


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


def _load_model(run_dir: Path):
    """The run's GPT (from its config.yaml) with the weights of its newest complete checkpoint."""
    from fpa_megatron.config import load_config
    from fpa_megatron.config_checks import padded_vocab_size
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.training.checkpoint import complete_checkpoints

    cfg = load_config(run_dir / "config.yaml")
    found = complete_checkpoints(Path(cfg.checkpoint.dir or run_dir / "checkpoints"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate")
    ckpt = found[-1]
    if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
        raise ValueError(f"{run_dir}: recall evaluation reads TP1 x PP1 checkpoints, this run used "
                         f"TP{cfg.parallel.tensor} x PP{cfg.parallel.pipeline}")
    model = build_gpt_model(cfg.model, padded_vocab_size(cfg.model.vocab_size, 1), make_penalty(cfg.model, cfg.fpa))
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(state, strict=True)
    return model, ckpt


def evaluate_run(run_dir: Path, test_prefix: str, buckets: list[tuple[int, int]], num_pairs: int) -> dict:
    """Score one run on the held-out sequences; write and return its recall.json."""
    model, ckpt = _load_model(run_dir)
    tokens = read_sequences(test_prefix)
    queries = query_table(tokens, num_pairs)
    result = {"checkpoint": str(ckpt), "step": int(ckpt.name.split("_")[1]), "test": test_prefix,
              **accuracy_by_bucket(recalled(model, tokens, queries), queries["distance"], buckets)}
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

    from fpa_megatron.parallel.state import init_distributed, init_model_parallel

    # one process: port 0 lets the store pick a free port (no race with other jobs)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    init_distributed()  # Megatron's layers need its (single-rank) process groups
    init_model_parallel(1, 1, seed=0)
    for run_dir in args.run_dirs:
        result = evaluate_run(Path(run_dir), args.test, buckets, args.num_pairs)
        accuracies = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result["buckets"].items())
        print(f"recall {run_dir}: {accuracies}", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
