"""`fpa-eval --checkpoint DIR (--data PREFIX|FILE.jsonl | --split valid|test|NAME | --tasks NAMES|YAML)`: LM loss and
perplexity, or downstream tasks through lm-evaluation-harness (`--tasks`, see inference/harness.py).

Model: a training checkpoint (any layout) runs as one TP1 x PP1 Megatron GPT in this process, the trainer's own
model code with its padded vocabulary (a loss over the real one), so the numbers are the trainer's; an
`fpa-export hf` directory runs in transformers (its vocabulary cut back to the real one: the same softmax).

Tokens:
- `--data PREFIX`: an indexed dataset (`PREFIX.bin/.idx`), all its documents in order, each ending with EOD.
- `--data FILE.jsonl`: raw text (the `--text-key` field of each line) tokenized with the run's tokenizer,
  each document followed by EOD, as `fpa-prep encode` stores them.
  Both are cut into windows of seq_length inputs, each predicting its next token; consecutive windows share
  one token, so every token after the first is predicted once. The loss is the mean over those tokens.
- `--split valid|test`: the run's own data config (prefixes, blend, split, seed) through the same
  GPTDataset builder as training, its first `--batches` global batches (default train.eval_iters): with the
  defaults exactly the samples the trainer validates on, averaged like the trainer (mean over micro-batches
  of each micro-batch's mean token loss).
- `--split NAME`: the run's named validation set `data.validation.NAME`, built as the trainer builds it: with the
  default --batches, the value the trainer logged as `val/NAME/loss`.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from data_prep.readers import check_text
from fpa_megatron.checkpoint.reader import read_model_checkpoint
from fpa_megatron.data.data_checks import validation_sets
from fpa_megatron.data.datasets import (build_gpt_datasets, build_tokenizer, build_validation_sets, dataset_tokens,
                                        micro_batches)
from fpa_megatron.export.hf import is_hf_dir, load_hf
from fpa_megatron.checkpoint.megatron_lm import megatron_lm
from fpa_megatron.options import EVAL_SPLITS
from fpa_megatron.run_tokenizer import tokenizer_vocab_size


@dataclass
class EvalResult:
    loss: float  # mean token cross-entropy (nats)
    tokens: int  # predicted tokens
    source: str  # what was evaluated, in words

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


# ------------------------------------------------------------------------------------------ token sources


def jsonl_tokens(path: str, encode: Callable[[str], list[int]], eod_id: int,
                 text_key: str = "text") -> tuple[np.ndarray, Counter]:
    """Every document of a JSON Lines file encoded and followed by EOD, concatenated, as fpa-prep stores them;
    records fpa-prep would reject (bad JSON, no string text, empty text) are skipped and counted by reason."""
    out: list[int] = []
    skipped: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid_json"] += 1
                continue
            bad = check_text(record, text_key, 0) if isinstance(record, dict) else ("not_an_object", "")
            if bad is not None:
                skipped[bad[0]] += 1
                continue
            out.extend(encode(record[text_key]))
            out.append(eod_id)
    return np.asarray(out, dtype=np.int64), skipped


def data_tokens(data: str, encode: Optional[Callable[[str], list[int]]], eod_id: int,
                text_key: str) -> tuple[np.ndarray, str]:
    """Tokens of `--data` (an indexed dataset prefix or a .jsonl file) and what they are, in words."""
    if Path(data + ".bin").is_file() and Path(data + ".idx").is_file():
        return dataset_tokens(data), f"indexed dataset {data}"
    if Path(data).is_file() and data.endswith((".jsonl", ".json")):
        if encode is None:
            raise ValueError(f"--data {data}: raw text needs the run's tokenizer (none found: pass --tokenizer)")
        tokens, skipped = jsonl_tokens(data, encode, eod_id, text_key)
        note = f" ({sum(skipped.values())} records skipped as fpa-prep rejects them: {dict(skipped)})" \
            if skipped else ""
        return tokens, f"{data}, field {text_key!r}, documents joined with EOD{note}"
    raise ValueError(f"--data {data!r}: neither an indexed dataset prefix ({data}.bin/.idx) nor a .jsonl file")


def windows(tokens: np.ndarray, seq_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) windows of up to seq_length tokens; the last may be shorter."""
    out = []
    for start in range(0, len(tokens) - 1, seq_length):
        chunk = tokens[start:start + seq_length + 1]
        out.append((chunk[:-1], chunk[1:]))
    return out


# ------------------------------------------------------------------------------------------ scoring


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def score_stream(token_losses, tokens: np.ndarray, seq_length: int, batch_size: int, source: str,
                 progress: bool = True) -> EvalResult:
    """Mean loss over every predicted token of `tokens`; token_losses(inputs [b, s], labels [b, s]) -> [b, s]."""
    pieces = windows(tokens, seq_length)
    if not pieces:
        raise ValueError(f"{source}: fewer than 2 tokens, nothing to evaluate")
    total, count = 0.0, 0
    bar = _progress(len(tokens) - 1, "fpa-eval") if progress else None
    full = [p for p in pieces if len(p[0]) == seq_length]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[p] for p in pieces if len(p[0]) != seq_length]  # the shorter last window alone
    for batch in batches:
        inputs = torch.from_numpy(np.stack([b[0] for b in batch]))
        labels = torch.from_numpy(np.stack([b[1] for b in batch]))
        losses = token_losses(inputs, labels).double()
        total += float(losses.sum())
        count += losses.numel()
        if bar is not None:
            bar.update(losses.numel())
    if bar is not None:
        bar.close()
    return EvalResult(total / count, count, source)


def split_micro_batches(ckpt, split: str, batches: Optional[int]) -> tuple[Iterator[dict], int, str]:
    """The run's `split` dataset as the trainer builds it; its first `batches` global batches as micro-batches."""
    cfg = ckpt.config
    t = cfg.train
    batches = batches or t.eval_iters
    if batches < 1:
        raise ValueError(f"--batches={batches} must be >= 1")
    wanted = batches * t.global_batch_size
    vocab = cfg.model.vocab_size or (tokenizer_vocab_size(cfg.data.tokenizer) if cfg.data.tokenizer else 0)
    named = validation_sets(cfg.data.validation)
    if split not in EVAL_SPLITS and split not in named:
        raise ValueError(f"--split={split!r} is not one of {', '.join(EVAL_SPLITS + tuple(named))} (valid, test, or "
                         f"a name of the run's data.validation)")
    if split in named:  # a named validation set, built as the trainer builds it
        prefixes = named[split][0]
        dataset = build_validation_sets({split: named[split]}, cfg.model.seq_length, t.seed, wanted,
                                        build_tokenizer(cfg.data.tokenizer, vocab), cfg.data.cache_dir,
                                        cfg.data.eod_mask_loss, cfg.data.document_mask)[split]
        describe = (f"validation set {split} ({', '.join(prefixes)}): first {batches} global batches of "
                    f"{t.global_batch_size} x {cfg.model.seq_length} tokens")
        return micro_batches(dataset, 0, t.micro_batch_size), wanted // t.micro_batch_size, describe
    # The trainer's request (train, valid, test) with valid = eval_iters global batches: GPTDataset's shuffle
    # depends on the sample counts, so the default --batches reproduces the trainer's validation samples.
    num_samples = (t.steps * t.global_batch_size, wanted if split == "valid" else 0, wanted if split == "test" else 0)
    datasets = build_gpt_datasets(
        cfg.data.prefixes, cfg.data.weights, cfg.data.split, cfg.model.seq_length, t.seed, num_samples,
        cfg.data.tokenizer, cfg.data.cache_dir, mock=cfg.data.mock, mock_vocab_size=vocab,
        eod_mask_loss=cfg.data.eod_mask_loss, document_mask=cfg.data.document_mask)
    dataset = datasets[1 if split == "valid" else 2]
    if dataset is None or len(dataset) < wanted:
        have = 0 if dataset is None else len(dataset)
        raise ValueError(f"the {split} split of data.split={cfg.data.split!r} has {have} samples,"
                         f" fewer than {batches} global batches of {t.global_batch_size}")
    count = wanted // t.micro_batch_size
    describe = (f"{split} split of {', '.join(cfg.data.prefixes) or 'mock data'} (data.split={cfg.data.split}): "
                f"first {batches} global batches of {t.global_batch_size} x {cfg.model.seq_length} tokens")
    return micro_batches(dataset, 0, t.micro_batch_size), count, describe


def score_split(lm, ckpt, split: str, batches: Optional[int] = None, progress: bool = True) -> EvalResult:
    """The trainer's validation loss on the same samples: mean over micro-batches of the masked mean token loss."""
    iterator, count, describe = split_micro_batches(ckpt, split, batches)
    bar = _progress(count * ckpt.config.train.micro_batch_size * ckpt.config.model.seq_length, "fpa-eval") \
        if progress else None
    means, tokens = [], 0
    for _ in range(count):
        batch = next(iterator)
        mask = batch["loss_mask"].double()
        losses = lm.token_losses(batch["tokens"], batch["labels"], batch["position_ids"],
                                 batch.get("document_ids")).double()
        means.append(float((losses * mask).sum() / mask.sum().clamp(min=1.0)))
        tokens += int(mask.sum())
        if bar is not None:
            bar.update(batch["tokens"].numel())
    if bar is not None:
        bar.close()
    return EvalResult(sum(means) / len(means), tokens, describe)


# ------------------------------------------------------------------------------------------ models


class HFScorer:
    """Per-token losses from a transformers causal LM (an exported directory)."""

    def __init__(self, model):
        self.model = model

    def token_losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(tokens).logits.float()
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def evaluate(checkpoint: str, data: Optional[str] = None, split: Optional[str] = None, batches: Optional[int] = None,
             text_key: str = "text", batch_size: int = 8, tokenizer: Optional[str] = None,
             progress: bool = True) -> EvalResult:
    """Loss and perplexity of `checkpoint` on `data` (prefix or .jsonl) or on the run's `split`."""
    if (data is None) == (split is None):
        raise ValueError("give exactly one of --data and --split")
    if is_hf_dir(checkpoint):
        if split is not None:
            raise ValueError(f"--split needs a training checkpoint (its run config); {checkpoint} is an exported model")
        return _evaluate_exported(checkpoint, data, text_key, batch_size, progress)
    return _evaluate_checkpoint(checkpoint, data, split, batches, text_key, batch_size, tokenizer, progress)


def _evaluate_checkpoint(checkpoint, data, split, batches, text_key, batch_size, tokenizer, progress) -> EvalResult:
    """A training checkpoint, as one TP1 x PP1 Megatron model in this process."""
    ckpt = read_model_checkpoint(checkpoint)
    if tokenizer is not None:
        ckpt.config.data.tokenizer = tokenizer
    with megatron_lm(ckpt) as lm:
        if split is not None:
            return score_split(lm, ckpt, split, batches, progress)
        # the run's tokenizer (EOD = its eos), or the mock data's (no text encoding, EOD = vocab - 1)
        tok = build_tokenizer(ckpt.config.data.tokenizer, ckpt.config.model.vocab_size or ckpt.padded_vocab_size)
        encode = tok.tokenize if ckpt.config.data.tokenizer else None
        tokens, source = data_tokens(data, encode, tok.eod, text_key)
        return score_stream(lm.token_losses, tokens, ckpt.config.model.seq_length, batch_size, source, progress)


def _evaluate_exported(path, data, text_key, batch_size, progress) -> EvalResult:
    """An `fpa-export hf` directory, in transformers."""
    loaded = load_hf(path)
    encode = None
    if loaded.tokenizer is not None:
        encode = lambda text: loaded.tokenizer.encode(text, add_special_tokens=False, verbose=False)  # noqa: E731
    tokens, source = data_tokens(data, encode, loaded.tokenizer_spec.eod_id, text_key)
    config = loaded.model.config
    seq = getattr(config, "max_position_embeddings", None) or config.n_positions
    return score_stream(HFScorer(loaded.model).token_losses, tokens, seq, batch_size, source, progress)
