"""The FPA attention penalty inside Megatron-core's core attention.

`PenalizedDotProductAttention` replaces `DotProductAttention` in the local GPT layer spec. Per local head it
computes ||A||_F^2 (A = post-softmax probabilities before dropout, or the pre-softmax scaled logits with the
masked entries excluded), mean over the sequences of the micro-batch, and hands lambda_t times that to the
optimizer through `PenaltyGradInjector`: identity on the attention output in forward, and in backward it
feeds `grad_scale` as the gradient of the penalty, on whatever pipeline stage the layer lives (Megatron's
MoE aux-loss auto-scaler pattern). `AttentionPenalty` is the run-time state shared by all layers of one
model replica: the current lambda, whether to compute at all, the gradient scale and the [L, H] record.
Each call runs on the kernel that `attention.dispatch` picks for `model.attention_impl` (with `auto`: SDPA when
no penalty is computed, else blockwise on CPU and the Triton kernel on CUDA).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor

from fpa_megatron.attention.dispatch import attend
from fpa_megatron.attention.documents import split_attention_mask
from fpa_megatron.attention.stats import AttentionStats
from fpa_megatron.options import ATTENTION_IMPLS, FPA_NORMALIZATIONS, FPA_TARGETS, require_one_of
from fpa_megatron.parallel.context import context_parallel_size
from fpa_megatron.parallel.state import compute_device


class AttentionPenalty:
    """Run-time state of the FPA penalty for one model replica (all its local layers and heads).

    The trainer sets `lambda_value` and `active` once per optimizer step (from the lambda schedule);
    `forward_backward` sets `grad_scale` (1 / num_microbatches: the schedule averages the LM loss the same way).
    Layers add their per-head values to `record` [num_layers, num_heads] at global indices; `calls`
    counts penalty computations (zero once `min_lambda` is reached); `path_calls` counts the attention
    calls per kernel taken ('sdpa', 'blockwise', 'triton', 'eager'; see `attention_path`). `stats`
    collects the attention diagnostics (collision, entropy, max logit) while its `measuring` flag is set,
    FPA on or off.
    """

    def __init__(self, num_layers: int, num_heads: int, target: str = "probs", normalize: str = "sum",
                 impl: str = "auto", block_size: int = 128):
        require_one_of("fpa.target", target, FPA_TARGETS)
        require_one_of("fpa.normalize", normalize, FPA_NORMALIZATIONS)
        require_one_of("model.attention_impl", impl, ATTENTION_IMPLS)
        self.num_layers, self.num_heads = num_layers, num_heads
        self.target, self.normalize, self.impl, self.block_size = target, normalize, impl, block_size
        self.lambda_value = 0.0
        self.active = False
        self.grad_scale = 1.0
        self.calls = 0
        self.path_calls: Counter = Counter()
        self.record = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.stats = AttentionStats(num_layers, num_heads, "eager" if impl == "eager" else "online", block_size)

    def set_step(self, lambda_value: float, active: bool) -> None:
        """Called once per optimizer step, before the forward-backward schedule."""
        self.lambda_value, self.active = float(lambda_value), bool(active)

    @property
    def should_compute(self) -> bool:
        """Whether the attention computes the penalty this step (lambda active and > 0)."""
        return self.active and self.lambda_value > 0.0

    def reset_record(self) -> None:
        self.record.zero_()

    def add(self, layer_index: int, head_offset: int, per_head: Tensor, seq_length: int) -> Tensor:
        """Record one layer's per-head penalty [np] (mean over the micro-batch); return lambda * its sum."""
        if self.normalize == "mean":
            per_head = per_head / (self.num_layers * self.num_heads * seq_length)
        self.calls += 1
        if not _inside_backward():  # activation recomputation reruns the forward inside backward
            heads = slice(head_offset, head_offset + per_head.numel())
            if self.record.device != per_head.device:  # keep the record where the heads are: no syncs
                self.record = self.record.to(per_head.device)
            self.record[layer_index, heads] += per_head.detach().to(self.record.dtype)
        return per_head.sum() * self.lambda_value


def _inside_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. recomputing a checkpointed forward)."""
    return torch._C._current_graph_task_id() != -1


class PenaltyGradInjector(torch.autograd.Function):
    """Identity on `output`; in backward, gives `penalty` the gradient `grad_scale` (the aux-loss auto-scaler)."""

    @staticmethod
    def forward(ctx, output: Tensor, penalty: Tensor, grad_scale: float) -> Tensor:
        ctx.save_for_backward(penalty)
        ctx.grad_scale = grad_scale
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (penalty,) = ctx.saved_tensors
        return grad_output, torch.full_like(penalty, ctx.grad_scale), None


class PenalizedDotProductAttention(DotProductAttention):
    """Megatron-core's core attention with the FPA penalty of its local heads (causal self-attention).

    Under context parallelism (C > 1) each rank holds two chunks of every sequence; the attention of its
    queries against every key runs across the CP ranks (`context_parallel_attention`), penalty included.

    `attention_mask`, the one argument Megatron hands down to the core attention: None (causal), a bool mask
    (True = masked; eager only), or, with document masking, the document ids [b, S] of the whole sequence
    (integers, attention/documents.py), which every kernel takes.
    """

    def __init__(self, config, *args, penalty: AttentionPenalty, **kwargs):
        # The parent asserts context_parallel_size == 1 (its own attention is local); that is the one check
        # that does not hold for us, so it sees a copy saying 1, and the real config is kept afterwards.
        super().__init__(_with_context_parallel_size_one(config), *args, **kwargs)
        self.config = config
        self.penalty = penalty
        if self.attention_dropout.p > 0 and penalty.impl != "eager":
            raise ValueError(f"model.attention_dropout={self.attention_dropout.p} needs model.attention_impl='eager' "
                             f"(got {penalty.impl!r})")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        assert packed_seq_params is None and attention_bias is None, "not supported by the FPA attention"
        sq, b, np_, hn = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attention_mask, document_ids = split_attention_mask(attention_mask)
        if self.penalty.stats.measuring:  # attention diagnostics: one no-grad micro-batch now and then
            self.penalty.stats.observe(self.layer_number - 1, self.pg_collection.tp.rank() * np_, q, k,
                                       self.softmax_scale, attention_mask, document_ids)
        out, row_penalty = self.attend(q, k, v, attention_mask, document_ids, self.penalty.should_compute)
        if row_penalty is not None:
            per_head = row_penalty.sum(-1).mean(0)  # [b, np, s] -> [np]; under CP this rank's rows only
            head_offset = self.pg_collection.tp.rank() * np_
            weighted = self.penalty.add(self.layer_number - 1, head_offset, per_head, sq * context_parallel_size())
            if torch.is_grad_enabled():
                out = PenaltyGradInjector.apply(out, weighted, self.penalty.grad_scale)
        # [b, np, s, hn] -> [s, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
               document_ids: Optional[Tensor], compute_penalty: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(out [b, h, s, d], row penalty [b, h, s] or None) on the kernel `attention_path` picks; counted."""
        cp_group = parallel_state.get_context_parallel_group() if context_parallel_size() > 1 else None
        dropout = self._dropout if self.attention_dropout.p > 0 and self.training else None
        path, out, row_penalty = attend(q, k, v, self.softmax_scale, impl=self.penalty.impl,
                                        target=self.penalty.target, compute_penalty=compute_penalty,
                                        block_size=self.penalty.block_size, attention_mask=attention_mask,
                                        document_ids=document_ids, cp_group=cp_group, dropout=dropout)
        self.penalty.path_calls[path] += 1
        return out, row_penalty

    def _dropout(self, probs: Tensor) -> Tensor:
        if self.config.sequence_parallel:
            return self.attention_dropout(probs)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_dropout(probs)


def _with_context_parallel_size_one(config):
    """A shallow copy of a TransformerConfig with context_parallel_size = 1 (see PenalizedDotProductAttention)."""
    if config.context_parallel_size == 1:
        return config
    local = copy.copy(config)
    local.context_parallel_size = 1
    return local


def reduce_penalty_record(penalty: AttentionPenalty, num_microbatches: int) -> Tensor:
    """The [L, H] penalty of the last step, complete on every rank.

    SUM over tensor-parallel ranks (heads) and pipeline stages (layers) -- each rank filled only its own
    cells --, SUM over context-parallel ranks (each holds some rows of the same sequences), then MEAN over
    data-parallel ranks (batches) and micro-batches. float64, on the CPU.
    """
    with torch.profiler.record_function("fpa/penalty_reduce"):
        record = penalty.record.to(compute_device()) / max(num_microbatches, 1)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(record, group=parallel_state.get_model_parallel_group())
            torch.distributed.all_reduce(record,
                                         group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            record /= parallel_state.get_data_parallel_world_size()
        return record.cpu()
