"""One optimizer step's forward and backward on Megatron-core's pipeline schedules, with the FPA penalty.

`forward_backward(...)` runs the schedule that fits the layout (no pipelining, 1F1B, or interleaved 1F1B over
the model chunks of a virtual pipeline), then makes the gradients complete on every stage (tied embedding
grads summed between the first chunk of the first stage and the last chunk of the last stage; the grads each
tensor-parallel rank holds only a share of summed over TP) and returns the step's LM loss, its z-loss and the
[L, H] penalty matrix, reduced across all ranks.

The loss that is differentiated is the LM loss plus, with optimizer.z_loss > 0, z_loss * the masked mean over
tokens of (log Z)^2 (the model keeps it per token, `GPTModelOverVocabulary`); `lm_loss` stays the
cross-entropy alone.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from megatron.core.pipeline_parallel import get_forward_backward_func

from fpa_megatron import faults
from fpa_megatron.model.penalized_attention import AttentionPenalty, reduce_penalty_record
from fpa_megatron.model.gpt import ModelChunks, model_chunks
from fpa_megatron.parallel.context import context_parallel_size, split_batch_for_context_parallel
from fpa_megatron.parallel.state import compute_device
from fpa_megatron.training.optimizer import reduced_gradients


@dataclass
class StepResult:
    lm_loss: float  # mean over micro-batches and data-parallel ranks
    penalty_matrix: torch.Tensor  # [L, H] float64: mean over sequences, summed over nothing
    tokens: int  # tokens processed by this step on all data-parallel ranks together
    z_loss: float | None = None  # z_loss * mean (log Z)^2, reduced as lm_loss; None when optimizer.z_loss = 0
    data_wait_s: float = 0.0  # this rank's time waiting for its micro-batches
    finished_at: float = 0.0  # time.perf_counter() as this rank's schedule ended, before the step's reductions

    @property
    def penalty(self) -> float:
        """F = sum over layers and heads (already normalized when fpa.normalize = mean)."""
        return float(self.penalty_matrix.sum())


def _masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(per_token.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    mask = loss_mask.reshape(-1).to(dtype)
    return (per_token.to(dtype).reshape(-1) * mask).sum() / num_tokens.to(dtype).clamp(min=1.0)


def _lm_loss(loss_mask: torch.Tensor, num_tokens: torch.Tensor, chunk, per_token_loss: torch.Tensor):
    """Cross-entropy summed over this rank's unmasked tokens, divided by the unmasked tokens of the whole
    micro-batch: its mean over the micro-batch. Under context parallelism each CP rank holds a share of it; the
    schedule multiplies this loss by C (and divides by #micro-batches), and DeepSpeed's gradient average over
    DP x CP divides by C again, so the CP ranks' gradients add up to the gradient of the whole mean.
    The z-loss (if the model `chunk` kept (log Z)^2) is the same masked mean times optimizer.z_loss, added."""
    loss = _masked_mean(per_token_loss, loss_mask, num_tokens)
    if faults.loss_factor() != 1.0:  # FPA_FAULT drills only (NaN or spike); 1.0 otherwise
        loss = loss * faults.loss_factor()
    record = {"lm_loss": loss.detach().clone()}
    take = getattr(chunk, "take_log_z_squared", None)  # absent from a stock Megatron GPTModel (tests compare one)
    log_z_squared = take() if take is not None else None
    if log_z_squared is not None:
        z_loss = chunk.z_loss * _masked_mean(log_z_squared, loss_mask, num_tokens)
        record["z_loss"] = z_loss.detach().clone()
        loss = loss + z_loss
    return loss, record


def _forward_step(engine, data_wait: list, data_iterator: Iterator, model):
    """One micro-batch through this stage (or model chunk): this context-parallel rank's chunks of it (all of
    it when C = 1). With a DeepSpeed engine, its forward wraps the model so that ZeRO's gradient hooks see the
    schedule's own backward calls. The time spent waiting for the batch is added to data_wait[0]."""
    device = compute_device()
    asked = time.perf_counter()
    batch = next(data_iterator)
    data_wait[0] += time.perf_counter() - asked
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    num_tokens = batch["loss_mask"].sum()  # of the whole micro-batch, before it is split over CP
    documents = batch.pop("document_ids", None)  # whole: every CP rank's attention reads every key's document
    batch = split_batch_for_context_parallel(batch)
    chunk = model
    if engine is not None:
        model = engine if model.vp_stage is None else partial(engine, chunk=model.vp_stage)
    # attention_mask None = causal (our attention builds it); a bool [b, 1, s, s] mask (True = masked) also works;
    # with data.document_mask, the document ids [b, s] go down the same argument (attention/documents.py)
    mask = batch.get("attention_mask") if documents is None else documents
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(_lm_loss, batch["loss_mask"], num_tokens, chunk)


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
    tied word-embedding gradient summed between the first and last pipeline stage (the first and the last
    model chunk with a virtual pipeline: the only chunks holding a copy)."""
    allreduce_tensor_parallel_partial_grads(model, engine)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    for chunk in model_chunks(model):
        if not getattr(chunk, "share_embeddings_and_output_weights", False):
            continue
        weight = chunk.shared_embedding_or_output_weight()
        if weight is not None and weight.grad is not None:
            torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def smallest_microbatch_count() -> int:
    """The fewest micro-batches a step may have: the interleaved schedule needs at least PP of them."""
    if parallel_state.get_virtual_pipeline_model_parallel_world_size():
        return parallel_state.get_pipeline_model_parallel_world_size()
    return 1


def forward_backward(model, data_iterator: Iterator, penalty: AttentionPenalty, *, num_microbatches: int,
                     micro_batch_size: int, seq_length: int, forward_only: bool = False,
                     engine=None) -> StepResult:
    """Forward (and backward unless forward_only) of num_microbatches micro-batches on this rank's stage.

    `model` is the bare Megatron module, or its `ModelChunks` (the schedule reads their config); `engine`, if
    given, is the DeepSpeed engine wrapping it, used for the forward calls.
    """
    penalty.reset_record()
    # The penalty's gradient, like the LM loss's, is scaled by C: the average over DP x CP must sum the CP shares.
    penalty.grad_scale = context_parallel_size() / num_microbatches
    schedule_model, data_wait = model, [0.0]
    if isinstance(model, ModelChunks):  # interleaved: every chunk reads each micro-batch from its own iterator
        schedule_model, data_iterator = list(model), list(itertools.tee(data_iterator, len(model)))
    with torch.profiler.record_function("fpa/forward_backward"):  # pipeline p2p inside: gloo:send / gloo:recv
        losses = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, engine, data_wait),
            data_iterator=data_iterator,
            model=schedule_model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    finished_at = time.perf_counter()
    if not forward_only:
        finalize_grads(model, engine)

    # LM loss and z-loss: computed on the last stage; share them with the other stages, add the CP shares,
    # average over DP. (Every stage knows whether the model has a z-loss: all chunks are built with it.)
    with_z = getattr(model_chunks(model)[-1], "z_loss", 0.0) > 0
    keys = ("lm_loss", "z_loss") if with_z else ("lm_loss",)
    loss = torch.zeros(len(keys), dtype=torch.float64, device=compute_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        loss += torch.stack([torch.stack([d[key].double() for key in keys]) for d in losses]).mean(dim=0)
    dp = parallel_state.get_data_parallel_world_size()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        loss /= dp
    return StepResult(
        lm_loss=float(loss[0]),
        penalty_matrix=reduce_penalty_record(penalty, num_microbatches),
        tokens=num_microbatches * micro_batch_size * seq_length * dp,
        z_loss=float(loss[1]) if with_z else None,
        data_wait_s=data_wait[0],
        finished_at=finished_at,
    )
