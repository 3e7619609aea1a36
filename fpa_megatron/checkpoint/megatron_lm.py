"""A checkpoint's model as one TP=1 x PP=1 Megatron GPTModel in this process (CPU), for scoring and sampling.

The same model code the trainer runs (penalized attention with lambda = 0, the padded vocabulary, a loss over
the real one), so its losses are the trainer's. Megatron's layers need process groups even for one rank:
`megatron_lm` opens a one-rank gloo group (in-memory store, no port) when none exists and closes it again.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from fpa_megatron.checkpoint.reader import ModelCheckpoint
from fpa_megatron.model.gpt import build_gpt_model, make_penalty
from fpa_megatron.parallel.state import destroy_model_parallel, init_model_parallel
from fpa_megatron.parallel.weights import load_global_state
from fpa_megatron.run_tokenizer import tokenizer_vocab_size


class MegatronLM:
    """The full model of a checkpoint on this process (build inside `megatron_lm`)."""

    def __init__(self, checkpoint: ModelCheckpoint):
        cfg = checkpoint.config
        self.checkpoint = checkpoint
        self.penalty = make_penalty(cfg.model, cfg.fpa)
        self.penalty.set_step(0.0, False)  # scoring needs no penalty
        self.model = build_gpt_model(cfg.model, checkpoint.padded_vocab_size, self.penalty,
                                     vocab_size=real_vocab_size(checkpoint),
                                     document_positions=cfg.data.document_mask)
        load_global_state(self.model, checkpoint.state_dict)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, padded vocab] logits (float32)."""
        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        return self.model(tokens, positions, None).float()

    @torch.no_grad()
    def token_losses(self, tokens: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token cross-entropy [batch, seq] of predicting `labels` from `tokens`, as the trainer computes it;
        a training micro-batch's position_ids and document_ids (data.document_mask) when it has them."""
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
        mask = None if document_ids is None else document_ids.to(self.device)
        return self.model(tokens, position_ids.to(self.device), mask, labels=labels).float()


def real_vocab_size(checkpoint: ModelCheckpoint) -> int:
    """The run's vocabulary (model.vocab_size, else its tokenizer's), which its loss's softmax covered."""
    cfg = checkpoint.config
    if cfg.model.vocab_size is None and cfg.data.tokenizer:
        try:
            return tokenizer_vocab_size(cfg.data.tokenizer)
        except ValueError:  # the tokenizer moved: the padded vocabulary, as before
            pass
    return cfg.model.vocab_size or checkpoint.padded_vocab_size


@contextmanager
def megatron_lm(checkpoint: ModelCheckpoint) -> Iterator[MegatronLM]:
    """MegatronLM of `checkpoint` with TP1 x PP1 process groups (a one-rank gloo group if none exists)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        init_model_parallel(1, 1, checkpoint.config.train.seed)
        yield MegatronLM(checkpoint)
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()
