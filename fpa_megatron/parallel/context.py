"""Context parallelism (CP) outside the attention: which tokens of a micro-batch this CP rank holds.

Every sequence is cut into 2C chunks and CP rank r keeps chunks r and 2C-1-r (Megatron's load-balanced causal
layout: the early chunk has little to attend to, the late one much, so every rank gets the same work).
`split_batch_for_context_parallel` applies it to a micro-batch (tokens, labels, loss mask and position ids
alike, an explicit attention mask by its query rows) with Megatron's own `get_batch_on_this_cp_rank`, which
runs on CPU as it is. `gather_sequence` is the inverse, for the no-grad attention diagnostics that need every
key of the sequence. With C = 1 both are the identity.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank
from torch import Tensor


def cp_chunk_bounds(seq_length: int, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two global position ranges [start, end) that CP rank `cp_rank` of `cp_size` holds: chunks r and
    2C-1-r of the 2C equal chunks of the sequence."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} of cp_size={cp_size}: need 0 <= cp_rank < cp_size")
    if seq_length % (2 * cp_size):
        raise ValueError(f"seq_length={seq_length} is not divisible by 2 * context parallel size = {2 * cp_size}")
    c = seq_length // (2 * cp_size)
    last = 2 * cp_size - 1 - cp_rank
    return (cp_rank * c, (cp_rank + 1) * c), (last * c, (last + 1) * c)


def context_parallel_size() -> int:
    """C (1 before the model-parallel groups exist)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def context_parallel_rank() -> int:
    return parallel_state.get_context_parallel_rank() if context_parallel_size() > 1 else 0


def split_batch_for_context_parallel(batch: dict) -> dict:
    """This CP rank's two chunks of every [b, s] tensor of the micro-batch (a new dict; the input is kept).

    An explicit attention_mask [b, 1, s, s] (True = masked) keeps the rows of this rank's queries and every
    key column in sequence order ([b, 1, s / C, s]), as Megatron's split does; the eager kernel applies it."""
    if context_parallel_size() == 1:
        return batch
    mask, seq = batch.get("attention_mask"), batch["tokens"].shape[1]
    if mask is not None and (mask.dim() != 4 or tuple(mask.shape[2:]) != (seq, seq)):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)}: with parallel.context > 1 it must be "
                         f"[b, 1, s, s] with s = {seq} (its query rows are split over the CP ranks)")
    parts = {key: value.contiguous() for key, value in batch.items() if value is not None}
    return get_batch_on_this_cp_rank(parts, parallel_state.get_context_parallel_group())


@torch.no_grad()
def gather_sequence(local: Tensor, seq_dim: int) -> Tensor:
    """The whole sequence in natural order from every CP rank's two chunks along `seq_dim` (no gradient)."""
    cp_size = context_parallel_size()
    if cp_size == 1:
        return local
    group = parallel_state.get_context_parallel_group()
    parts = [torch.empty_like(local) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    chunks: list = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim=seq_dim)
        chunks[rank], chunks[2 * cp_size - 1 - rank] = first, second
    return torch.cat(chunks, dim=seq_dim)
