"""One optimizer step's forward and backward on Megatron-core's pipeline schedules, with the FPA penalty.

`forward_backward(...)` runs the schedule that fits the layout (no pipelining, or 1F1B), then makes the
gradients complete on every stage (tied embedding grads summed between the first and last stage; the
grads each tensor-parallel rank holds only a share of summed over TP) and returns the step's LM loss and
the [L, H] penalty matrix, both reduced across all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from megatron.core.pipeline_parallel import get_forward_backward_func

from fpa_megatron import faults
from fpa_megatron.model.attention_penalty import AttentionPenalty, reduce_penalty_record
from fpa_megatron.parallel.state import compute_device
from fpa_megatron.training.optimizer import reduced_gradients


@dataclass
class StepResult:
    lm_loss: float  # mean over micro-batches and data-parallel ranks
    penalty_matrix: torch.Tensor  # [L, H] float64: mean over sequences, summed over nothing
    tokens: int  # tokens processed by this step on all data-parallel ranks together

    @property
    def penalty(self) -> float:
        """F = sum over layers and heads (already normalized when fpa.normalize = mean)."""
        return float(self.penalty_matrix.sum())


def _lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean cross-entropy over the unmasked tokens of one micro-batch (the schedule divides by #micro-batches)."""
    dtype = torch.promote_types(per_token_loss.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    mask = loss_mask.reshape(-1).to(dtype)
    loss = (per_token_loss.to(dtype).reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    if faults.loss_factor() != 1.0:  # FPA_FAULT drills only (NaN or spike); 1.0 otherwise
        loss = loss * faults.loss_factor()
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(engine, data_iterator: Iterator, model):
    """One micro-batch through this stage. With a DeepSpeed engine, its forward wraps the model so that
    ZeRO's gradient hooks see the schedule's own backward calls."""
    device = compute_device()
    batch = {key: value.to(device, non_blocking=True) for key, value in next(data_iterator).items()}
    if engine is not None:
        model = engine
    # attention_mask None = causal (our attention builds it); a bool [b, 1, s, s] mask (True = masked) also works
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(_lm_loss, batch["loss_mask"])


def is_tensor_parallel_partial(name: str, param) -> bool:
    """Replicated over TP but with a gradient that is only this rank's share: with sequence parallelism the
    norms and the row-parallel biases (Megatron marks them `sequence_parallel`; each rank saw its slice of
    the sequence), and always the per-head query/key norms (each rank saw its heads). Megatron's rule."""
    return getattr(param, "sequence_parallel", False) or ".q_layernorm." in name or ".k_layernorm." in name


def allreduce_tensor_parallel_partial_grads(model, engine=None) -> None:
    """Sum the partial gradients (`is_tensor_parallel_partial`) over the TP group: one flattened all-reduce.

    Megatron does this in `finalize_model_grads`, only through its own DDP wrapper; with DeepSpeed we do it
    here. Under ZeRO-2 the gradients were already averaged over DP in backward: DeepSpeed's accumulated
    copies are summed then (the sums over TP and DP commute).
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    params = [p for n, p in model.named_parameters() if p.requires_grad and is_tensor_parallel_partial(n, p)]
    grads = [g for g in reduced_gradients(engine, params) if g is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


def finalize_grads(model, engine=None) -> None:
    """Complete the gradients after the schedule's backward: the TP sum of partial gradients, then the
    tied word-embedding gradient summed between the first and last pipeline stage."""
    allreduce_tensor_parallel_partial_grads(model, engine)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    weight = model.shared_embedding_or_output_weight()
    if weight is not None and weight.grad is not None:
        torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def forward_backward(model, data_iterator: Iterator, penalty: AttentionPenalty, *, num_microbatches: int,
                     micro_batch_size: int, seq_length: int, forward_only: bool = False,
                     engine=None) -> StepResult:
    """Forward (and backward unless forward_only) of num_microbatches micro-batches on this rank's stage.

    `model` is the bare Megatron module (the schedule reads its config); `engine`, if given, is the
    DeepSpeed engine wrapping it, used for the forward calls.
    """
    penalty.reset_record()
    penalty.grad_scale = 1.0 / num_microbatches
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, engine),
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not forward_only:
        finalize_grads(model, engine)

    # LM loss: computed on the last stage; share it with the other stages, then average over DP.
    loss = torch.zeros(1, dtype=torch.float64, device=compute_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        loss += torch.stack([d["lm_loss"].double() for d in losses]).mean()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        dp_group = parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(loss, group=dp_group)
        loss /= torch.distributed.get_world_size(dp_group)
    dp = parallel_state.get_data_parallel_world_size()
    return StepResult(
        lm_loss=float(loss),
        penalty_matrix=reduce_penalty_record(penalty, num_microbatches),
        tokens=num_microbatches * micro_batch_size * seq_length * dp,
    )
