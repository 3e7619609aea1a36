"""Attention diagnostics in every run: every `logging.attention_stats_interval` steps, one fixed micro-batch
goes through the model without gradients and every layer records its heads' collision, entropy and max
logit (`fpa_megatron.attention.stats`), FPA on or off.

The probe micro-batch is the first one of this data-parallel rank in the validation split (the training
split when there is none): the same tokens at every measurement, so the curves show the model changing, not
the batch. Under pipeline parallelism every stage runs the probe together (Megatron's forward-only
schedule, one micro-batch); the statistics are then reduced like the penalty record.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from fpa_megatron.attention.stats import attention_summary
from fpa_megatron.config import RunConfig
from fpa_megatron.data.datasets import micro_batches
from fpa_megatron.model.penalized_attention import AttentionPenalty
from fpa_megatron.training.forward_backward import forward_backward, smallest_microbatch_count
from fpa_megatron.training.metrics import MetricsLogger


class AttentionDiagnostics:
    """Owns the cadence of the attention statistics; `maybe_measure(step)` returns {stat: [L, H]} or None;
    `after_step(step)` also logs them and returns their whole-model summary for the step's record."""

    def __init__(self, interval: int, model, engine, penalty: AttentionPenalty, valid_ds, train_ds,
                 micro_batch_size: int, seq_length: int, logger: Optional[MetricsLogger] = None):
        self.interval, self.model, self.engine, self.penalty = interval, model, engine, penalty
        self.datasets = [ds for ds in (valid_ds, train_ds) if ds is not None]
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.logger = logger
        self._batch = None

    @classmethod
    def for_run(cls, cfg: RunConfig, logger: MetricsLogger, model, engine, penalty: AttentionPenalty, valid_ds,
                train_ds) -> "AttentionDiagnostics":
        """Every `logging.attention_stats_interval` steps (0: never), on the run's micro-batch shape."""
        return cls(cfg.logging.attention_stats_interval, model, engine, penalty, valid_ds, train_ds,
                   cfg.train.micro_batch_size, cfg.model.seq_length, logger)

    def after_step(self, step: int, final: bool = False) -> dict[str, float]:
        """Measure and log when due; the summary scalars for the step's record ({} when not due)."""
        stats = self.maybe_measure(step, final)
        if stats is None:
            return {}
        self.logger.log_attention(step, stats)
        return attention_summary(stats)

    def maybe_measure(self, step: int, final: bool = False) -> Optional[dict[str, torch.Tensor]]:
        """Measure at step 0, every `interval` steps and at the final step (nothing when interval is 0)."""
        if self.interval <= 0 or not (step % self.interval == 0 or final):
            return None
        return self.measure()

    def probe_batch(self) -> dict:
        """This DP rank's first micro-batch of the validation split, or of the training split if the
        validation split is missing or too small."""
        if self._batch is None:
            dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            dataset = next(ds for ds in self.datasets if len(ds) >= self.micro_batch_size * dp)
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed: keep training's RNG untouched
                self._batch = next(micro_batches(dataset, 0, self.micro_batch_size, dp_rank, dp))
        return self._batch

    def measure(self) -> dict[str, torch.Tensor]:
        """One forward of the probe micro-batch without gradients or penalty; {stat: [L, H] float64}."""
        penalty, stats = self.penalty, self.penalty.stats
        saved = (penalty.lambda_value, penalty.active)
        penalty.set_step(0.0, False)  # the probe measures the attention, it does not train it
        stats.reset()
        stats.measuring = True
        self.model.eval()
        try:
            # the same micro-batch n times where the schedule needs n > 1 (each records the same values)
            n = smallest_microbatch_count()
            with torch.no_grad():
                forward_backward(self.model, iter([self.probe_batch()] * n), penalty, num_microbatches=n,
                                 micro_batch_size=self.micro_batch_size, seq_length=self.seq_length,
                                 forward_only=True, engine=self.engine)
        finally:
            stats.measuring = False
            self.model.train()
            penalty.set_step(*saved)
        return stats.reduce()
