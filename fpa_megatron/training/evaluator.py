"""Validation on its own cadence: the mean LM loss over the first `train.eval_iters` global batches of the
validation split (the same batches each time), at step 0 of a fresh run, every `train.eval_interval` steps and
at the last step; and the same on each named set of `data.validation` (`val/<name>/loss`)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from fpa_megatron.config import RunConfig
from fpa_megatron.data.datasets import micro_batches
from fpa_megatron.model.penalized_attention import AttentionPenalty
from fpa_megatron.rules import ResolvedLayout
from fpa_megatron.training.forward_backward import forward_backward
from fpa_megatron.training.metrics import MetricsLogger


class Evaluator:
    def __init__(self, cfg: RunConfig, layout: ResolvedLayout, model, engine, penalty: AttentionPenalty, valid_ds,
                 logger: Optional[MetricsLogger] = None, named: Optional[dict] = None):
        self.logger = logger
        self.named = named or {}  # name -> held-out dataset
        self.interval, self.iters = cfg.train.eval_interval, cfg.train.eval_iters
        self.micro_batch_size, self.seq_length = cfg.train.micro_batch_size, cfg.model.seq_length
        self.num_microbatches, self.data_parallel = layout.num_microbatches, layout.data_parallel
        self.model, self.engine, self.penalty, self.valid_ds = model, engine, penalty, valid_ds

    def should_evaluate(self, step: int, final: bool = False) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or final)

    def after_step(self, step: int, final: bool = False) -> dict[str, float]:
        """Evaluate and log when due; {"val_loss": ..., "val_loss/<name>": ...} for the step's record ({} when
        not due)."""
        if not self.should_evaluate(step, final):
            return {}
        val_loss = self.evaluate()
        self.logger.log_eval(step, val_loss)
        record = {"val_loss": val_loss}
        for name, dataset in self.named.items():
            record[f"val_loss/{name}"] = loss = self.evaluate(dataset)
            self.logger.log_eval(step, loss, name)
        return record

    def evaluate(self, dataset=None) -> float:
        """Mean LM loss over the first eval_iters global batches of `dataset` (default: the validation split),
        without the penalty."""
        batches = micro_batches(self.valid_ds if dataset is None else dataset, 0, self.micro_batch_size,
                                parallel_state.get_data_parallel_rank(), self.data_parallel)
        saved = (self.penalty.lambda_value, self.penalty.active)
        self.penalty.set_step(0.0, False)  # validation reports the LM loss; no penalty needed
        self.model.eval()
        losses = []
        with torch.no_grad():
            for _ in range(self.iters):
                result = forward_backward(self.model, batches, self.penalty, num_microbatches=self.num_microbatches,
                                          micro_batch_size=self.micro_batch_size, seq_length=self.seq_length,
                                          forward_only=True, engine=self.engine)
                losses.append(result.lm_loss)
        self.model.train()
        self.penalty.set_step(*saved)
        return sum(losses) / len(losses)
