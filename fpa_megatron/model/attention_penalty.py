"""The FPA attention penalty inside Megatron-core's core attention.

`PenalizedDotProductAttention` replaces `DotProductAttention` in the local GPT layer spec. Per local head it
computes ||A||_F^2 (A = post-softmax probabilities before dropout, or the pre-softmax scaled logits with the
masked entries excluded), mean over the sequences of the micro-batch, and hands lambda_t times that to the
optimizer through `PenaltyGradInjector`: identity on the attention output in forward, and in backward it
feeds `grad_scale` as the gradient of the penalty, on whatever pipeline stage the layer lives (Megatron's
MoE aux-loss auto-scaler pattern). `AttentionPenalty` is the run-time state shared by all layers of one
model replica: the current lambda, whether to compute at all, the gradient scale and the [L, H] record.
Each call runs on the kernel `attention_path` picks for `model.attention_impl` (with `auto`: SDPA when no
penalty is computed, else blockwise on CPU and the Triton kernel on CUDA); `eager_attention` is the reference.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor

from fpa_megatron.model.attention_options import ATTENTION_IMPLS
from fpa_megatron.model.attention_options import FPA_NORMALIZATIONS as NORMALIZATIONS
from fpa_megatron.model.attention_options import FPA_TARGETS as TARGETS
from fpa_megatron.model.attention_stats import AttentionStats
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
        if target not in TARGETS:
            raise ValueError(f"fpa.target={target!r}: expected one of {TARGETS}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"fpa.normalize={normalize!r}: expected one of {NORMALIZATIONS}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
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


class SoftmaxWithCollision(torch.autograd.Function):
    """p = softmax(s) along the last dim and c = sum_j p_j^2, with one fused backward.

    The gradient of c with respect to p is 2 p, so the penalty folds into the softmax backward as
    dP += 2 g p: dS = p (dP + 2 g p - D - 2 g c), the formula of docs/fpa_math.md section 2, with no extra
    [b, h, s, s] temporaries beyond one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, scores: Tensor):
        probs = torch.softmax(scores, dim=-1)
        # sum_j p_ij^2 as a squared norm: one fused reduction pass, the fastest of the forms we measured
        collision = torch.linalg.vector_norm(probs, dim=-1).square()  # [b, h, s]
        ctx.save_for_backward(probs)
        return probs, collision

    @staticmethod
    def backward(ctx, grad_probs: Tensor, grad_collision: Tensor):
        (probs,) = ctx.saved_tensors
        if grad_probs is None:
            grad_probs = torch.zeros_like(probs)
        if grad_collision is not None:
            # dP + 2 g P, in place: the incoming gradient buffer is this node's alone (one consumer of probs)
            grad_probs = grad_probs.addcmul_(probs, (2.0 * grad_collision).unsqueeze(-1))
        return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def causal_mask(sq: int, sk: int, device) -> Tensor:
    """[sq, sk] bool, True where key j is in the future of query i (masked)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1 + sk - sq)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                    compute_penalty: bool = True, causal: bool = True, attention_mask: Optional[Tensor] = None,
                    dropout=None) -> tuple[Tensor, Optional[Tensor]]:
    """Attention (causal by default) with its per-row penalty, materializing the [b, h, s, s] scores.

    q: [b, hq, s, d]; k, v: [b, hkv, s, d] (GQA: hq % hkv == 0). attention_mask: optional bool, True = masked,
    broadcastable to [b, hq, s, s]. Returns (out [b, hq, s, d], row_penalty [b, hq, s] float32 or None):
    probs: sum_j p_ij^2 (before dropout); logits: sum over unmasked j of s_ij^2.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # [b, h, sq, sk]
    if causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    else:
        mask = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        mask = mask | attention_mask
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(acc_dtype).masked_fill(mask, float("-inf"))
    row_penalty = None
    if compute_penalty and target == "probs":
        probs, row_penalty = SoftmaxWithCollision.apply(scores)
    else:
        probs = torch.softmax(scores, dim=-1)
        if compute_penalty:  # logits: the masked entries are excluded
            unmasked = scores.masked_fill(mask, 0.0)
            row_penalty = torch.linalg.vector_norm(unmasked, dim=-1).square()
    probs = probs.to(q.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs, v), row_penalty


def attention_path(impl: str, compute_penalty: bool, device_type: str, has_mask: bool) -> str:
    """The kernel that runs one attention call: 'sdpa', 'blockwise', 'triton' or 'eager'.

    `auto` picks the fastest exact one for the call: no penalty -> 'sdpa'; penalty on CUDA -> 'triton'; on
    CPU -> 'blockwise'; an explicit attention_mask (not the causal default) -> 'eager', the only path that
    takes arbitrary masks. The other impls always run their own kernel (causal only, except eager).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl == "auto":
        if has_mask:
            return "eager"
        if not compute_penalty:
            return "sdpa"
        return "triton" if device_type == "cuda" else "blockwise"
    if has_mask and impl != "eager":
        raise ValueError(f"model.attention_impl={impl!r} is causal only: the batch's attention_mask must be None "
                         f"(use 'auto' or 'eager' for an explicit mask)")
    return impl


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Causal attention without the penalty through torch's fused kernels (FlashAttention or memory-efficient
    attention on CUDA, a flash-style kernel on CPU); GQA reads the shared K/V heads without repeating them."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _triton_module():
    """fpa_megatron.model.triton_attention, or the reason it cannot be imported (tried once per process)."""
    try:
        import fpa_megatron.model.triton_attention as module
    except ImportError as err:
        return None, f"fpa_megatron.model.triton_attention cannot be imported ({err})"
    return module, None


_triton_warnings: set = set()


def load_triton_attention(q: Tensor, k: Tensor, required: bool):
    """`triton_attention` if the Triton kernel can run on q, k; else None after one warning per reason
    (`auto` falls back to blockwise), or ValueError when the config asked for `triton` itself."""
    module, reason = _triton_module()
    if module is not None:
        supported, reason = module.triton_attention_supported(q, k)
        if supported:
            return module.triton_attention
    if required:
        raise ValueError(f"model.attention_impl='triton' cannot run here: {reason}")
    if reason not in _triton_warnings:
        _triton_warnings.add(reason)
        warnings.warn(f"model.attention_impl='auto': the Triton FPA kernel cannot run ({reason}); "
                      f"the penalized attention falls back to the blockwise kernel", RuntimeWarning, stacklevel=2)
    return None


class PenalizedDotProductAttention(DotProductAttention):
    """Megatron-core's core attention with the FPA penalty of its local heads (causal self-attention).

    Under context parallelism (C > 1) each rank holds two chunks of every sequence; the attention of its
    queries against every key runs across the CP ranks (`context_parallel_attention`), penalty included.
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
        if self.penalty.stats.measuring:  # attention diagnostics: one no-grad micro-batch now and then
            self.penalty.stats.observe(self.layer_number - 1, self.pg_collection.tp.rank() * np_, q, k,
                                       self.softmax_scale, attention_mask)
        out, row_penalty = self.attend(q, k, v, attention_mask, self.penalty.should_compute)
        if row_penalty is not None:
            per_head = row_penalty.sum(-1).mean(0)  # [b, np, s] -> [np]; under CP this rank's rows only
            head_offset = self.pg_collection.tp.rank() * np_
            weighted = self.penalty.add(self.layer_number - 1, head_offset, per_head, sq * context_parallel_size())
            if torch.is_grad_enabled():
                out = PenaltyGradInjector.apply(out, weighted, self.penalty.grad_scale)
        # [b, np, s, hn] -> [s, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
               compute_penalty: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(out [b, h, s, d], row penalty [b, h, s] or None) on the kernel `attention_path` picks; counted."""
        impl, kernel_args = self.penalty.impl, dict(target=self.penalty.target, compute_penalty=compute_penalty)
        path = attention_path(impl, compute_penalty, q.device.type, attention_mask is not None)
        if path == "triton":
            triton_attention = load_triton_attention(q, k, required=impl == "triton")
            path = "blockwise" if triton_attention is None else path
        self.penalty.path_calls[path] += 1
        if context_parallel_size() > 1:  # the same kernel, run across the CP ranks' key chunks
            from fpa_megatron.parallel.context_attention import context_parallel_attention

            return context_parallel_attention(q, k, v, self.softmax_scale,
                                              cp_group=parallel_state.get_context_parallel_group(), kernel=path,
                                              block_size=self.penalty.block_size, attention_mask=attention_mask,
                                              **kernel_args)
        if path == "sdpa":
            return sdpa_attention(q, k, v, self.softmax_scale), None
        if path == "triton":
            return triton_attention(q, k, v, self.softmax_scale, **kernel_args)
        if path == "blockwise":
            from fpa_megatron.model.blockwise_attention import blockwise_attention  # imports this module

            return blockwise_attention(q, k, v, self.softmax_scale, block_size=self.penalty.block_size, **kernel_args)
        dropout = self._dropout if self.attention_dropout.p > 0 and self.training else None
        return eager_attention(q, k, v, self.softmax_scale, attention_mask=attention_mask, dropout=dropout,
                               **kernel_args)

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
    record = penalty.record.to(compute_device()) / max(num_microbatches, 1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(record, group=parallel_state.get_model_parallel_group())
        torch.distributed.all_reduce(record, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        record /= parallel_state.get_data_parallel_world_size()
    return record.cpu()
