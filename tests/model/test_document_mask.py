"""Document masking (`data.document_mask`): packed documents attend only to themselves, in every kernel and on
context-parallel ranks, with the exact penalty.

- the document ids and positions against Megatron's own `reset_position_ids`, and the per-block key ranges
  against a brute-force scan;
- the blockwise kernel (and its partial API with offsets) against the eager reference with the explicit
  document mask, float64, values and gradients, both targets, GQA, documents of one token, a document that
  fills the sample, a sample with no EOD, samples of one micro-batch with different boundaries;
- skipped tiles: the blockwise kernel computes only the tiles of the documents (counted);
- CP 2 and CP 4 (real gloo ranks) with documents that cross the chunk and rank boundaries against a float64
  softmax over the whole sequence with the document mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from fpa_megatron.attention import blockwise
from fpa_megatron.attention.blockwise import (blockwise_attention, blockwise_attention_partial,
                                              blockwise_attention_partial_backward)
from fpa_megatron.attention.choice import attention_path
from fpa_megatron.attention.context_parallel import context_parallel_attention
from fpa_megatron.attention.documents import document_ids, document_mask, document_positions, key_ranges
from fpa_megatron.attention.partial import Partial, merge_partials, row_penalty, score_grad_shift
from fpa_megatron.attention.reference import eager_attention
from fpa_megatron.parallel.context import cp_chunk_bounds
from fpa_megatron.testing import run_distributed

EOD = 0
D = 8
SCALE = 1 / math.sqrt(D)


def packed_tokens(seq: int, lengths_per_sample: list[list[int]]) -> torch.Tensor:
    """[b, seq] tokens whose documents have the given lengths (each ends with EOD; the rest is one open document)."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for lengths in lengths_per_sample:
        row = torch.randint(1, 50, (seq,), generator=g)
        end = 0
        for n in lengths:
            end += n
            if end <= seq:
                row[end - 1] = EOD
        rows.append(row)
    return torch.stack(rows)


# name -> documents of each sample of a micro-batch of 2 (lengths; what is left of S is one more document)
CASES = {
    "mixed": [[5, 1, 9, 3, 12], [17, 2, 2, 10]],  # a document of 1 token, boundaries inside tiles
    "one_token_docs": [[1] * 12, [2, 1, 1, 3]],
    "fills_sample": [[37], [37]],  # one document that ends with the sample's last token
    "no_eod": [[], []],
    "different": [[36], [1, 1, 1]],
}
SEQ = 37  # no power of two: partial tiles everywhere


def test_document_ids_and_positions_equal_megatron_reset_position_ids():
    tokens = packed_tokens(SEQ, CASES["mixed"])
    docs = document_ids(tokens, EOD)
    for row, row_docs in zip(tokens, docs):
        _, _, positions = _get_ltor_masks_and_position_ids(row, EOD, True, False, False, False)
        assert torch.equal(document_positions(row_docs[None])[0], positions)
        assert row_docs[0] == 0 and bool((row_docs[1:] - row_docs[:-1] == (row[:-1] == EOD).long()).all())


@pytest.mark.parametrize("block,delta,causal", [(4, 0, True), (5, 3, True), (3, -4, True), (4, 0, False)])
def test_key_ranges_hold_exactly_the_visible_keys(block, delta, causal):
    docs = document_ids(packed_tokens(SEQ, CASES["mixed"]), EOD)
    q_docs, k_docs = docs[:, 10:30], docs[:, 10 - delta:30 - delta] if delta >= 0 else docs[:, 14:34]
    lo, hi = key_ranges(q_docs, k_docs, block, causal=causal, delta=delta)
    for b in range(docs.shape[0]):
        for n, i0 in enumerate(range(0, q_docs.shape[1], block)):
            visible = [j for j in range(k_docs.shape[1]) for i in range(i0, min(i0 + block, q_docs.shape[1]))
                       if q_docs[b, i] == k_docs[b, j] and (not causal or j <= i + delta)]
            if visible:
                assert lo[b, n] <= min(visible) and max(visible) < hi[b, n]
                # the range is tight: its ends are keys of the block's first and last rows' documents
                assert k_docs[b, lo[b, n]] == q_docs[b, i0]
            else:
                assert lo[b, n] >= hi[b, n] or not any(
                    q_docs[b, i] == k_docs[b, j] for i in range(i0, min(i0 + block, q_docs.shape[1]))
                    for j in range(lo[b, n], hi[b, n]))


def _inputs(seq: int, hq: int, hkv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, seq, D, generator=g, dtype=torch.float64) * 2 for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(2, hq, seq, D, generator=g, dtype=torch.float64), \
        torch.randn(2, hq, seq, generator=g, dtype=torch.float64)


def _values_and_grads(fn, q, k, v, grad_out, grad_penalty):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, penalty = fn(*leaves)
    loss = (out * grad_out).sum() + (0 if penalty is None else (penalty * grad_penalty).sum())
    return [out, penalty, *torch.autograd.grad(loss, leaves)]


def _assert_close(got, ref, what, tolerance=1e-10):
    for name, a, b in zip(("out", "penalty", "dq", "dk", "dv"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), f"{what}: {name} is not finite"
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < tolerance, f"{what}: {name} differs by {err:.2e} (relative)"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target,compute_penalty,hkv", [("probs", True, 2), ("logits", True, 4), ("probs", False, 1)])
def test_blockwise_with_documents_equals_the_eager_reference(case, target, compute_penalty, hkv):
    docs = document_ids(packed_tokens(SEQ, CASES[case]), EOD)
    inputs = _inputs(SEQ, 4, hkv)
    ref = _values_and_grads(lambda q, k, v: eager_attention(q, k, v, SCALE, target=target,
                                                            compute_penalty=compute_penalty,
                                                            attention_mask=document_mask(docs, docs)), *inputs)
    for block, key_block in ((4, 8), (64, 2048), (5, 10)):
        got = _values_and_grads(lambda q, k, v: blockwise_attention(
            q, k, v, SCALE, target=target, compute_penalty=compute_penalty, block_size=block,
            key_block_size=key_block, document_ids=docs), *inputs)
        _assert_close(got, ref, f"{case} block {block}x{key_block}")


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_blockwise_partials_with_documents_merge_to_the_whole(target):
    """Queries [20, 37) against keys [0, 20) (no causal limit) and [20, 37) (causal): merged, then the backward
    of each slice from the merged statistics, equal the eager reference's rows [20, 37)."""
    docs = document_ids(packed_tokens(SEQ, CASES["mixed"]), EOD)
    q, k, v, grad_out, grad_penalty = _inputs(SEQ, 4, 2)
    rows = slice(20, SEQ)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, penalty = eager_attention(*leaves, SCALE, target=target, attention_mask=document_mask(docs, docs))
    loss = (out[:, :, rows] * grad_out[:, :, rows]).sum() + (penalty[:, :, rows] * grad_penalty[:, :, rows]).sum()
    ref_grads = torch.autograd.grad(loss, leaves)
    slices = [(slice(0, 20), False, 0), (slice(20, SEQ), True, 20)]
    parts = [Partial(*blockwise_attention_partial(q[:, :, rows], k[:, :, keys], v[:, :, keys], SCALE, target=target,
                                                  causal=causal, q_offset=20, k_offset=k_offset, block_size=4,
                                                  key_block_size=8, q_documents=docs[:, rows],
                                                  k_documents=docs[:, keys]))
             for keys, causal, k_offset in slices]
    merged = merge_partials(parts, target)
    _assert_close([merged.out, row_penalty(merged, target)], [out[:, :, rows].detach(), penalty[:, :, rows].detach()],
                  "forward")
    collision = row_penalty(merged, target) if target == "probs" else None
    delta = score_grad_shift(merged.out, grad_out[:, :, rows], collision, grad_penalty[:, :, rows])
    dq = torch.zeros_like(q[:, :, rows])
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for keys, causal, k_offset in slices:
        dq_p, dk_p, dv_p = blockwise_attention_partial_backward(
            q[:, :, rows], k[:, :, keys], v[:, :, keys], grad_out[:, :, rows], merged.lse2, delta,
            grad_penalty[:, :, rows], SCALE, target=target, causal=causal, q_offset=20, k_offset=k_offset,
            block_size=4, key_block_size=8, q_documents=docs[:, rows], k_documents=docs[:, keys])
        dq += dq_p
        dk[:, :, keys] += dk_p
        dv[:, :, keys] += dv_p
    _assert_close([dq, dk, dv], [ref_grads[0][:, :, rows], ref_grads[1], ref_grads[2]], "backward")


def test_blockwise_computes_only_the_tiles_of_the_documents(monkeypatch):
    """Scores computed = sum over query blocks of the keys in their documents' range: with documents of 16 tokens
    at S = 256 and blocks of 16 aligned to them, exactly sum(len^2)-ish: one 16 x 16 tile per block."""
    seq, length = 256, 16
    tokens = packed_tokens(seq, [[length] * (seq // length)] * 2)
    docs = document_ids(tokens, EOD)
    q, k, v, *_ = _inputs(seq, 2, 2)
    computed = []
    real_bmm = torch.bmm

    def counting_bmm(a, b, **kwargs):
        if a.shape[-1] == D:  # q . k^T: [n, rows, d] x [n, d, cols]
            computed.append(a.shape[0] * a.shape[1] * b.shape[2])  # (batch x kv heads) x rows x keys
        return real_bmm(a, b, **kwargs)

    monkeypatch.setattr(blockwise.torch, "bmm", counting_bmm)
    blockwise_attention(q, k, v, SCALE, block_size=length, key_block_size=2048, document_ids=docs)
    masked = sum(computed)
    computed.clear()
    blockwise_attention(q, k, v, SCALE, block_size=length, key_block_size=2048)
    causal = sum(computed)
    assert masked == 2 * 2 * (seq // length) * length * length  # b x hkv x one 16 x 16 tile per document
    assert causal == 2 * 2 * sum(i1 * length for i1 in range(length, seq + 1, length))  # every key up to the block
    assert masked / causal < 2 * length / seq


def test_the_kernel_choice_with_documents():
    assert attention_path("auto", True, "cpu", False, True) == "blockwise"
    assert attention_path("auto", False, "cpu", False, True) == "blockwise"  # not SDPA: it would need [s, s]
    assert attention_path("auto", False, "cuda", False, True) == "triton"
    assert attention_path("eager", True, "cpu", False, True) == "eager"
    with pytest.raises(ValueError, match="cannot combine"):
        attention_path("auto", True, "cpu", True, True)


# ----------------------------------------------------------------------------------------------------------
# context parallelism

CP_CASES = [("blockwise", "probs", True, 4), ("blockwise", "logits", True, 64), ("blockwise", "probs", False, 4),
            ("eager", "probs", True, 64)]
try:
    from fpa_megatron.attention.triton_kernels import INTERPRETING
except ImportError:
    INTERPRETING = False
if INTERPRETING:
    CP_CASES += [("triton", "probs", True, 64)]
# (C, S, document lengths of the 2 samples): documents crossing chunk and rank boundaries, one that spans all
CP_LAYOUTS = [(2, 28, [[5, 9, 1, 6], [20]]), (4, 40, [[3, 11, 2, 14], [1, 1, 33]])]


def _reference(q, k, v, grad_out, grad_penalty, docs, target, compute_penalty):
    return _values_and_grads(lambda q, k, v: eager_attention(q, k, v, SCALE, target=target,
                                                             compute_penalty=compute_penalty,
                                                             attention_mask=document_mask(docs, docs)),
                             q, k, v, grad_out, grad_penalty)


def _local(x, seq, cp, rank):
    (a0, a1), (b0, b1) = cp_chunk_bounds(seq, cp, rank)
    return torch.cat([x[:, :, a0:a1], x[:, :, b0:b1]], dim=2)


def _cp_documents_rank(layouts, cases):
    world, me = dist.get_world_size(), dist.get_rank()
    results = {}
    for cp, seq, lengths in layouts:
        groups = [dist.new_group(list(range(i, i + cp))) for i in range(0, world, cp)]
        group = groups[me // cp]
        rank = dist.get_rank(group)
        docs = document_ids(packed_tokens(seq, lengths), EOD)
        q, k, v, grad_out, grad_penalty = (_local(t, seq, cp, rank) for t in _inputs(seq, 4, 2))
        per_case = []
        for kernel, target, compute_penalty, block in cases:
            dtype = torch.float32 if kernel == "triton" else torch.float64  # Triton has no float64
            leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]  # fresh leaves per case
            out, penalty = context_parallel_attention(*leaves, SCALE, cp_group=group, target=target,
                                                      compute_penalty=compute_penalty, kernel=kernel,
                                                      block_size=block, document_ids=docs)
            loss = (out.double() * grad_out).sum() + (0 if penalty is None else (penalty.double() * grad_penalty).sum())
            loss.backward()
            per_case.append([out.detach(), None if penalty is None else penalty.detach(),
                             *(x.grad for x in leaves)])
        results[cp] = (rank, per_case)
    return results


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_cp_documents_rank, 4, CP_LAYOUTS, CP_CASES)


@pytest.mark.parametrize("cp,seq,lengths", CP_LAYOUTS)
def test_context_parallel_with_documents_equals_the_whole_sequence(cp_results, cp, seq, lengths):
    docs = document_ids(packed_tokens(seq, lengths), EOD)
    inputs = _inputs(seq, 4, 2)
    for i, (kernel, target, compute_penalty, _) in enumerate(CP_CASES):
        ref = _reference(*inputs, docs, target, compute_penalty)
        for rank_results in cp_results:
            if cp not in rank_results:
                continue
            rank, per_case = rank_results[cp]
            got = per_case[i]
            local_ref = [None if t is None else _local(t if t.dim() == 4 else t[..., None], seq, cp, rank)
                         for t in ref]
            local_ref[1] = None if ref[1] is None else local_ref[1][..., 0]
            # dk, dv: each rank gets the gradients of its own keys (summed over every rank's queries)
            _assert_close(got, local_ref, f"{kernel} {target} CP{cp} rank {rank}",
                          tolerance=1e-10 if kernel != "triton" else 1e-5)
