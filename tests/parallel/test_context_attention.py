"""Attention across context-parallel ranks against float64 attention over the whole sequence.

Real gloo processes (fpa_megatron.testing.run_distributed), CP 2 and 4: each rank holds chunks r and 2C-1-r of
fp32 inputs drawn from one seed; output, row penalty and dq, dk, dv of its tokens must match an explicit float64
softmax over the whole sequence, computed here, within 1e-5 relative. One spawn runs every case of a CP size.
The merge of partial results and the blockwise kernel's query/key offsets are checked in one process.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from fpa_megatron.model.blockwise_attention import (blockwise_attention_partial,
                                                     blockwise_attention_partial_backward)
from fpa_megatron.parallel.context_attention import (Partial, context_parallel_attention, cp_chunk_bounds,
                                                     merge_partials, row_penalty, score_grad_shift)
from fpa_megatron.testing import run_distributed

B, HQ, HKV, D = 2, 4, 2, 8
SCALE = 1 / math.sqrt(D)
# (kernel, target, compute_penalty, block_size)
CP_CASES = [("blockwise", "probs", True, 4), ("blockwise", "logits", True, 64), ("blockwise", "probs", False, 4),
            ("eager", "probs", True, 64), ("eager", "logits", True, 64), ("sdpa", "probs", False, 64)]
NAMES = ("out", "penalty", "dq", "dk", "dv")


def global_inputs(seq_len: int, seed: int = 0):
    """float64 q, k, v [b, h, S, d] and the upstream gradients of the output and of the row penalty."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, seq_len, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV))
    grad_out = torch.randn(B, HQ, seq_len, D, generator=g, dtype=torch.float64)
    grad_penalty = torch.randn(B, HQ, seq_len, generator=g, dtype=torch.float64)
    return q, k, v, grad_out, grad_penalty


def local_part(x: torch.Tensor, seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The rank's two chunks of x [..., S, ...] along dim 2."""
    (a0, a1), (b0, b1) = cp_chunk_bounds(seq_len, cp_size, cp_rank)
    return torch.cat([x[:, :, a0:a1], x[:, :, b0:b1]], dim=2)


def reference(q, k, v, grad_out, grad_penalty, target, compute_penalty, q_rows=None):
    """Explicit float64 causal softmax over the whole sequence; (out, penalty, dq, dk, dv). q_rows: only these
    query positions enter the loss (the single-process partial tests)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = SCALE * q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    s = q.shape[2]
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), -1)
    out = probs @ v.repeat_interleave(group, 1)
    penalty = (probs * probs).sum(-1) if target == "probs" else scores.masked_fill(future, 0.0).square().sum(-1)
    rows = slice(None) if q_rows is None else q_rows
    loss = (out[:, :, rows] * grad_out[:, :, rows]).sum()
    if compute_penalty:
        loss = loss + (penalty[:, :, rows] * grad_penalty[:, :, rows]).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return [None if t is None else t.detach() for t in (out, penalty if compute_penalty else None, *grads)]


def rel_err(got, ref):
    """max |got - ref| / max |ref|; a non-finite value anywhere fails."""
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _cp_rank_cases(seq_len: int, cases):
    """In each rank: every case on this rank's chunks (fp32); returns (out, penalty, dq, dk, dv) per case."""
    group = dist.group.WORLD
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, grad_out, grad_penalty = (local_part(t, seq_len, cp_size, rank) for t in global_inputs(seq_len))
    results = []
    for kernel, target, compute_penalty, block_size in cases:
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        out, penalty = context_parallel_attention(*leaves, SCALE, cp_group=group, target=target,
                                                  compute_penalty=compute_penalty, kernel=kernel,
                                                  block_size=block_size)
        loss = (out.double() * grad_out).sum()
        if penalty is not None:
            assert penalty.dtype == torch.float32
            loss = loss + (penalty.double() * grad_penalty).sum()
        loss.backward()
        results.append([None if t is None else t.detach() for t in (out, penalty, *(x.grad for x in leaves))])
    return results


@pytest.mark.parametrize("cp_size,seq_len", [(2, 28), (4, 40)])
def test_context_parallel_attention_matches_float64_whole_sequence(cp_size, seq_len):
    per_rank = run_distributed(_cp_rank_cases, cp_size, seq_len, CP_CASES)
    inputs = global_inputs(seq_len)
    refs = {}
    for i, (kernel, target, compute_penalty, _) in enumerate(CP_CASES):
        ref = refs.setdefault((target, compute_penalty), reference(*inputs, target, compute_penalty))
        for rank, results in enumerate(per_rank):
            got = results[i]
            assert (got[1] is None) == (not compute_penalty)
            errors = {name: rel_err(g, local_part(r, seq_len, cp_size, rank))
                      for name, g, r in zip(NAMES, got, ref) if r is not None}
            assert max(errors.values()) <= 1e-5, (kernel, target, compute_penalty, rank, errors)
