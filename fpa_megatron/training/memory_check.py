"""The planner against reality: the memory `fpa-plan` predicts for this run's layout next to what a step really
held, at the first step of every run (and, on a GPU, at every evaluation), so a wrong plan shows in the log before
it shows as an out-of-memory error.

- GPU: predicted = the planner's tensors of this rank's pipeline stage (weights, gradients, fp32 master,
  Adam moments, fp32 gradient partition, activations; `model.memory.step_memory` without its allocator margin);
  measured = `torch.cuda.max_memory_allocated()` since the last report.
- CPU: there is no allocator to ask, so the first step's forward and backward run under `LiveTensorBytes` (it
  counts every storage an op creates until torch frees it); predicted = this stage's weights, gradients and
  DeepSpeed's reduce bucket plus its activation peak, measured = this rank's parameter bytes plus the peak live
  bytes of that step (what the planner's own tests compare, with DeepSpeed's buffers).
A difference of more than `WARN_FRACTION` is a warning naming both numbers, on the rank that sees it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core import parallel_state

from fpa_megatron.config import RunConfig
from fpa_megatron.model.live_memory import LiveTensorBytes
from fpa_megatron.model.memory import BYTES, Layout, activation_peak, optimizer_bytes, stage_parameters, step_memory
from fpa_megatron.rules import ResolvedLayout
from fpa_megatron.run_log import get_logger
from fpa_megatron.training.metrics import MetricsLogger

WARN_FRACTION = 0.25
log = get_logger("memory")


class MemoryCheck:
    def __init__(self, cfg: RunConfig, layout: ResolvedLayout, model, logger: MetricsLogger, first_step: int):
        self.cfg, self.logger, self.first_step = cfg, logger, first_step + 1
        self.eval_interval = cfg.train.eval_interval
        self.cuda = torch.cuda.is_available()
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        p = cfg.parallel
        self.plan = Layout(tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline, context=p.context,
                           data=layout.data_parallel, sequence_parallel=p.sequence_parallel,
                           zero_stage=cfg.optimizer.zero_stage, recompute=cfg.model.recompute,
                           micro_batch_size=cfg.train.micro_batch_size, num_microbatches=layout.num_microbatches)
        self.padded_vocab = layout.padded_vocab_size
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._live_peak = None

    @contextlib.contextmanager
    def measure(self, step: int) -> Iterator[None]:
        """Around the forward and backward of `step`: on CPU the first step runs under LiveTensorBytes."""
        if self.cuda or step != self.first_step:
            yield
            return
        with LiveTensorBytes() as live:
            yield
        self._live_peak = live.peak

    def predicted_bytes(self) -> int:
        if self.cuda:
            row = step_memory(self.cfg, self.plan, self.padded_vocab, device="cuda")
            return int(row["tensors"])
        params = stage_parameters(self.cfg, self.plan, self.padded_vocab, self.stage)
        activations = activation_peak(self.cfg, self.plan, self.padded_vocab, self.stage, device="cpu")["peak"]
        gradients = optimizer_bytes(params, self.plan, self.cfg.model.dtype)["gradients"]  # and the reduce bucket
        return params * BYTES[self.cfg.model.dtype] + gradients + activations

    def measured_bytes(self) -> int:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return peak
        return self.param_bytes + self._live_peak

    def after_step(self, step: int, final: bool = False) -> dict[str, float]:
        """At the first step (and on a GPU at every evaluation): log both and return them for the step's record."""
        due = step == self.first_step or (self.cuda and self.eval_interval > 0 and step % self.eval_interval == 0)
        if not due:
            return {}
        predicted, measured = self.predicted_bytes(), self.measured_bytes()
        ratio = measured / predicted
        source = "max allocated" if self.cuda else "live tensor bytes"
        self.logger.log_memory(step, predicted / 1e9, measured / 1e9, source, self.stage)
        if abs(ratio - 1) > WARN_FRACTION:
            log.warning(f"step {step}: pipeline stage {self.stage} measured {measured / 1e9:.3f} GB ({source}), "
                        f"{ratio:.2f}x the {predicted / 1e9:.3f} GB fpa-plan predicts for this layout "
                        f"({self.plan.name()}): the planner's memory model is off by more than "
                        f"{WARN_FRACTION:.0%} here")
        return {"memory_predicted_gb": predicted / 1e9, "memory_measured_gb": measured / 1e9}
