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

from fpa_megatron.attention.blockwise import (blockwise_attention_partial,
                                                     blockwise_attention_partial_backward)
from fpa_megatron.attention.partial import Partial, merge_partials, row_penalty, score_grad_shift
from fpa_megatron.attention.context_parallel import context_parallel_attention
from fpa_megatron.parallel.context import cp_chunk_bounds
from fpa_megatron.testing import run_distributed

B, HQ, HKV, D = 2, 4, 2, 8
SCALE = 1 / math.sqrt(D)
# (kernel, target, compute_penalty, block_size)
CP_CASES = [("blockwise", "probs", True, 4), ("blockwise", "logits", True, 64), ("blockwise", "probs", False, 4),
            ("eager", "probs", True, 64), ("eager", "logits", True, 64), ("sdpa", "probs", False, 64)]
try:  # the Triton kernels on CPU run interpreted (tests/conftest.py sets TRITON_INTERPRET=1; ranks inherit it)
    from fpa_megatron.attention.triton_kernels import INTERPRETING
except ImportError:
    INTERPRETING = False
if INTERPRETING:
    CP_CASES += [("triton", "probs", True, 64)]  # logits: tests/model/test_triton_attention.py (offsets)
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


def _cp_rank_cases(layouts, cases):
    """In each of 4 ranks: for each (cp_size, seq_len) of `layouts`, every case on this rank's chunks (fp32),
    CP 2 on the groups {0, 1} and {2, 3} (group ranks differ from global ones), CP 4 on all; returns
    {(cp_size, seq_len): [(out, penalty, dq, dk, dv) per case]} for the layouts this rank is in."""
    world, me = dist.get_world_size(), dist.get_rank()
    results = {}
    for cp_size, seq_len in layouts:
        groups = [dist.new_group(list(range(i, i + cp_size))) for i in range(0, world, cp_size)]  # all ranks
        group = groups[me // cp_size]
        rank = dist.get_rank(group)
        q, k, v, grad_out, grad_penalty = (local_part(t, seq_len, cp_size, rank) for t in global_inputs(seq_len))
        per_case = []
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
            per_case.append([None if t is None else t.detach() for t in (out, penalty, *(x.grad for x in leaves))])
        results[cp_size, seq_len] = (rank, per_case)
    return results


LAYOUTS = [(2, 28), (4, 40)]  # S = 2 C x 7 and 2 C x 5: chunks of 7 and 5 tokens, no power of two


@pytest.fixture(scope="module")
def cp_results():
    """One spawn of 4 ranks for every layout and case: [rank results] (the spawn is most of the time)."""
    return run_distributed(_cp_rank_cases, 4, LAYOUTS, CP_CASES)


@pytest.mark.parametrize("cp_size,seq_len", LAYOUTS)
def test_context_parallel_attention_matches_float64_whole_sequence(cp_results, cp_size, seq_len):
    inputs = global_inputs(seq_len)
    refs = {}
    for i, (kernel, target, compute_penalty, _) in enumerate(CP_CASES):
        ref = refs.setdefault((target, compute_penalty), reference(*inputs, target, compute_penalty))
        for rank_results in cp_results:
            rank, per_case = rank_results[cp_size, seq_len]
            got = per_case[i]
            assert (got[1] is None) == (not compute_penalty)
            errors = {name: rel_err(g, local_part(r, seq_len, cp_size, rank))
                      for name, g, r in zip(NAMES, got, ref) if r is not None}
            assert max(errors.values()) <= 1e-5, (kernel, target, compute_penalty, rank, errors)


# ----------------------------------------------------------------------------------------------------------
# one process: the merge, and the kernels' query/key offsets


def _explicit_partial(scores: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, target: str) -> Partial:
    """float64 partial over the keys `visible` [s, sk] marks (rows that see none: out 0, lse2 -inf)."""
    masked = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(masked, -1)
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    out = torch.exp(masked - safe.unsqueeze(-1)) @ v
    if target == "probs":
        stat = torch.logsumexp(2 * masked, -1) / math.log(2)
    else:
        stat = scores.masked_fill(~visible, 0.0).square().sum(-1)
    return Partial(out, lse / math.log(2), stat)


@pytest.mark.parametrize("target", ["probs", "logits"])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_merge_partials_equals_attention_over_the_union(target, parts):
    """Keys dealt at random to `parts` disjoint sets (some rows see none of a set): merged output, LSE and
    penalty equal the attention over all visible keys, in float64."""
    g = torch.Generator().manual_seed(parts)
    s, sk = 9, 13
    scores = 3.0 * torch.randn(2, s, sk, generator=g, dtype=torch.float64)
    v = torch.randn(2, sk, 5, generator=g, dtype=torch.float64)
    visible = torch.ones(s, sk, dtype=torch.bool).tril(sk - s)  # causal, aligned to the last key
    owner = torch.randint(parts, (sk,), generator=g)
    partials = [_explicit_partial(scores, v, visible & (owner == p), target) for p in range(parts)]
    merged = merge_partials(partials, target)
    whole = _explicit_partial(scores, v, visible, target)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    expected_penalty = (probs * probs).sum(-1) if target == "probs" else whole.stat
    assert (merged.out - probs @ v).abs().max() <= 1e-12
    assert (merged.lse2 - whole.lse2).abs().max() <= 1e-12
    assert (row_penalty(merged, target) - expected_penalty).abs().max() <= 1e-12 * expected_penalty.abs().max()


def check_key_slices(forward, backward, seq_len, query_rows, cuts, target, compute_penalty, device="cpu",
                     **kernel_kwargs):
    """Queries [q0, q1) of a seq_len sequence against the key slices between `cuts`, each through the kernel's
    partial forward with its offsets (causal where the slice reaches past row q0's keys, else non-causal),
    merged; then each slice's backward with the merged statistics. Against float64 over the whole sequence
    (only these query rows in the loss): output, penalty, dq, and dk, dv of every key, within 1e-5."""
    q, k, v, grad_out, grad_penalty = global_inputs(seq_len)
    q0, q1 = query_rows
    ref = reference(q, k, v, grad_out, grad_penalty, target, compute_penalty, q_rows=slice(q0, q1))
    stat_target = target if compute_penalty else None
    q_rows, k32, v32 = q[:, :, q0:q1].float().to(device), k.float().to(device), v.float().to(device)
    pieces = []
    for j0, j1 in zip(cuts[:-1], cuts[1:]):
        causal = j1 > q0 + 1  # slices wholly before the first query: every key visible, the non-causal path
        args = dict(target=stat_target, causal=causal, q_offset=q0 if causal else 0, k_offset=j0 if causal else 0,
                    **kernel_kwargs)
        pieces.append((j0, j1, args, Partial(*forward(q_rows, k32[:, :, j0:j1], v32[:, :, j0:j1], SCALE, **args))))
    merged = merge_partials([p[3] for p in pieces], stat_target)
    penalty = row_penalty(merged, target) if compute_penalty else None
    rows = slice(q0, q1)
    assert rel_err(merged.out.cpu(), ref[0][:, :, rows]) <= 1e-5
    if compute_penalty:
        assert rel_err(penalty.cpu(), ref[1][:, :, rows]) <= 1e-5
    go = grad_out[:, :, rows].float().to(device)
    gp = grad_penalty[:, :, rows].float().to(device) if compute_penalty else None
    delta = score_grad_shift(merged.out, go, penalty if target == "probs" else None, gp)
    dq, dks, dvs = 0, [], []
    for j0, j1, args, _ in pieces:
        dq_p, dk_p, dv_p = backward(q_rows, k32[:, :, j0:j1], v32[:, :, j0:j1], go, merged.lse2, delta, gp, SCALE,
                                    **args)
        dq, dks, dvs = dq + dq_p, dks + [dk_p], dvs + [dv_p]
    errors = {"dq": rel_err(dq.cpu(), ref[2][:, :, rows]), "dk": rel_err(torch.cat(dks, 2).cpu(), ref[3]),
              "dv": rel_err(torch.cat(dvs, 2).cpu(), ref[4])}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("target,compute_penalty", [("probs", True), ("logits", True), ("probs", False)])
@pytest.mark.parametrize("block_size,key_block_size", [(4, 4), (4, 1024), (3, 5)])
def test_blockwise_partials_with_offsets_merge_to_whole_attention(target, compute_penalty, block_size,
                                                                   key_block_size):
    """Slices before, across and after the queries' diagonal (rows that see nothing of a slice, a slice that
    nobody sees), GQA, ragged blocks and tiles."""
    check_key_slices(blockwise_attention_partial, blockwise_attention_partial_backward, 23, (6, 17),
                     [0, 4, 9, 15, 20, 23], target, compute_penalty, block_size=block_size,
                     key_block_size=key_block_size)


def test_cp_chunk_bounds_and_bad_arguments():
    assert cp_chunk_bounds(28, 2, 0) == ((0, 7), (21, 28))
    assert cp_chunk_bounds(28, 2, 1) == ((7, 14), (14, 21))
    assert cp_chunk_bounds(40, 4, 2) == ((10, 15), (25, 30))
    assert cp_chunk_bounds(12, 1, 0) == ((0, 6), (6, 12))
    with pytest.raises(ValueError, match="seq_length=30 is not divisible by 2 \\* context parallel size = 4"):
        cp_chunk_bounds(30, 2, 0)
    with pytest.raises(ValueError, match="cp_rank=2 of cp_size=2"):
        cp_chunk_bounds(28, 2, 2)
    x, kv = torch.zeros(1, 4, 6, 8), torch.zeros(1, 2, 6, 8)
    cases = {"kernel='sdpa' computes no penalty": dict(kernel="sdpa"),
             "kernel='flash'": dict(kernel="flash"), "target='entropy'": dict(target="entropy")}
    for words, kwargs in cases.items():
        with pytest.raises(ValueError, match=words):
            context_parallel_attention(x, kv, kv, 0.1, cp_group=None, **kwargs)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="kernel='blockwise' is causal only: an explicit attention_mask needs"):
        context_parallel_attention(x, kv, kv, 0.1, cp_group=None, attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(1, 1, 6, 5\): expected \[b, h, s_local, S\]"):
        context_parallel_attention(x, kv, kv, 0.1, cp_group=None, kernel="eager", attention_mask=mask[..., :5])
    with pytest.raises(ValueError, match="s_local=5"):
        context_parallel_attention(x[:, :, :5], kv[:, :, :5], kv[:, :, :5], 0.1, cp_group=None)
