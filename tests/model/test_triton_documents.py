"""The Triton kernels with document masking (packed documents that attend only to themselves) against the
float64 eager reference with `document_mask`.

As in test_triton_attention.py: under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1),
compiled with CUDA. Each case checks the output, the row penalty and the gradients of q, k, v for random upstream
gradients of the output and of the penalty, within 1e-5 relative in float32. The shapes are small but span
several tiles (interpreter tiles 64 x 32 and 32 x 64), so that every kernel meets tiles inside one document (the
unmasked path), tiles across a boundary (masked) and tiles outside its range (skipped).
"""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.attention.documents import document_mask
from fpa_megatron.attention.partial import Partial, merge_partials, row_penalty, score_grad_shift
from fpa_megatron.attention.reference import eager_attention
from fpa_megatron.attention.triton_attention import (document_ranges, triton_attention, triton_attention_partial,
                                                     triton_attention_partial_backward)
from tests.model.test_triton_attention import DEVICE, assert_close_all, make_inputs, rel_err, run


def doc_ids(*samples: list[int]) -> torch.Tensor:
    """[b, s] document ids from each sample's document lengths (the number of EODs before each token)."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in samples])


# name: (b, hq, hkv, s, d, target, causal, document lengths per sample)
CASES = {
    # 1-token documents at the start, a long document with whole tiles inside it, a ragged last tile; the
    # second sample holds one document (no EOD)
    "probs-gqa4x2-batch2": (2, 4, 2, 160, 16, "probs", True, ([5, 1, 1, 1, 120, 32], [160])),
    # boundaries elsewhere in each sample; a document that fills the sample but its last token
    "logits-gqa4x2-batch2": (2, 4, 2, 150, 16, "logits", True, ([1, 1, 1, 70, 1, 76], [149, 1])),
    # bidirectional inside each document; head dim 8 (zero-padded to 16)
    "probs-noncausal-d8": (1, 2, 1, 90, 8, "probs", False, ([33, 1, 56],)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_documents_match_eager(case):
    b, hq, hkv, s, d, target, causal, lengths = CASES[case]
    docs = doc_ids(*lengths).to(DEVICE)
    inputs = make_inputs(b, hq, hkv, s, d, seed=5)
    kwargs = dict(softmax_scale=d ** -0.5, target=target, causal=causal)
    got = run(triton_attention, *inputs, torch.float32, document_ids=docs, **kwargs)
    ref = run(eager_attention, *inputs, torch.float64, attention_mask=document_mask(docs, docs), **kwargs)
    assert got[1].shape == (b, hq, s)
    assert_close_all(got, ref, 1e-5)


def test_triton_documents_without_penalty_and_penalty_only():
    """compute_penalty=False (no penalty, output gradient only), and only the penalty in the loss."""
    docs = doc_ids([7, 1, 40, 30], [78]).to(DEVICE)
    q, k, v, grad_out, grad_penalty = make_inputs(2, 2, 1, 78, 16, seed=6)
    mask = document_mask(docs, docs)
    got = run(triton_attention, q, k, v, grad_out, None, torch.float32, softmax_scale=0.25, compute_penalty=False,
              document_ids=docs)
    ref = run(eager_attention, q, k, v, grad_out, None, torch.float64, softmax_scale=0.25, compute_penalty=False,
              attention_mask=mask)
    assert got[1] is None
    assert_close_all(got, ref, 1e-5)
    got = run(triton_attention, q, k, v, None, grad_penalty, torch.float32, softmax_scale=0.25, target="logits",
              document_ids=docs)
    ref = run(eager_attention, q, k, v, None, grad_penalty, torch.float64, softmax_scale=0.25, target="logits",
              attention_mask=mask)
    assert_close_all(got, ref, 1e-5)


def test_document_ranges_against_the_mask():
    """Per query row the keys [row_lo, row_hi) it sees and per key the rows [col_lo, col_hi) that see it: exactly
    the visible entries of document_mask | causal, with query row i `delta` positions after key i."""
    q_docs = doc_ids([3, 1, 1, 9, 6]) + 2
    for k_docs, delta, causal in ((doc_ids([5, 1, 6, 1, 7]), 0, True), (doc_ids([2, 4, 1, 1, 5, 7]), 4, True),
                                  (doc_ids([2, 4, 1, 1, 5, 7]), 0, False), (doc_ids([9]) + 1, 30, True)):
        sq, sk = q_docs.shape[1], k_docs.shape[1]
        visible = ~document_mask(q_docs, k_docs)[:, 0]
        if causal:
            visible &= torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + delta
        ranges = document_ranges(q_docs, k_docs, causal=causal, delta=delta)
        assert all(t.dtype == torch.int32 for t in ranges)
        cols, rows = torch.arange(sk), torch.arange(sq)
        from_rows = (cols[None, :] >= ranges.row_lo[0][:, None]) & (cols[None, :] < ranges.row_hi[0][:, None])
        from_cols = (rows[:, None] >= ranges.col_lo[0][None, :]) & (rows[:, None] < ranges.col_hi[0][None, :])
        assert torch.equal(from_rows, visible[0]) and torch.equal(from_cols, visible[0]), (delta, causal)
        for t in ranges:
            assert (t[:, 1:] >= t[:, :-1]).all()  # non-decreasing: a tile's range is its ends' ranges


def test_triton_documents_skip_tiles_outside_the_range():
    """Queries of the last document against all keys: the key tiles before its first key are never read (NaN
    there changes nothing), and the keys of the other documents get zero gradients."""
    docs = doc_ids([64, 64]).to(DEVICE)
    q, k, v, grad_out, _ = (t.float() for t in make_inputs(1, 2, 2, 128, 16, seed=7))
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :64], poisoned_v[:, :, :64] = float("nan"), float("nan")
    rows = slice(64, 128)
    args = dict(q_offset=64, q_documents=docs[:, rows], k_documents=docs)
    out, lse2, stat = triton_attention_partial(q[:, :, rows], poisoned_k, poisoned_v, 0.25, target="logits",
                                               **args)
    ref_out, ref_penalty = eager_attention(q[:, :, rows].double(), k[:, :, rows].double(), v[:, :, rows].double(),
                                           0.25, target="logits")
    assert rel_err(out.double(), ref_out) <= 1e-5 and rel_err(stat, ref_penalty) <= 1e-5
    delta = score_grad_shift(out, grad_out[:, :, rows], None, None)
    dq, dk, dv = triton_attention_partial_backward(q[:, :, rows], poisoned_k, poisoned_v, grad_out[:, :, rows], lse2,
                                                   delta, None, 0.25, **args)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, 64:]).all() and torch.isfinite(dv[:, :, 64:]).all()
    assert (dk[:, :, :64] == 0).all() and (dv[:, :, :64] == 0).all()


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_triton_document_partials_merge_to_whole_attention(target):
    """Queries [40, 117) of 150 against key slices before them, across their diagonal and past them, with
    offsets, GQA 2/1, two samples with different boundaries: merged (partial.merge_partials), against the float64 eager
    attention with the document mask over the whole sequence; then each slice's backward with the merged
    statistics. Rows that see no key of a slice (another document, or causal) get out 0, lse2 -inf and the
    empty statistic (probs -inf, logits 0)."""
    s, (q0, q1), cuts = 150, (40, 117), [0, 37, 40, 117, 130, 150]
    docs = doc_ids([30, 1, 1, 50, 68], [45, 1, 104])
    q, k, v, grad_out, grad_penalty = (t.cpu() for t in make_inputs(2, 2, 1, s, 16, seed=8))
    scale = 0.25
    # the reference: float64 over the whole sequence, only the rows [q0, q1) in the loss
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, penalty = eager_attention(*leaves, scale, target=target, attention_mask=document_mask(docs, docs))
    rows = slice(q0, q1)
    loss = (out[:, :, rows] * grad_out[:, :, rows]).sum() + (penalty[:, :, rows] * grad_penalty[:, :, rows]).sum()
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(loss, leaves)

    q_rows, k32, v32 = (t.float().to(DEVICE) for t in (q[:, :, rows], k, v))
    q_docs = docs[:, rows].to(DEVICE)
    pieces = []
    for j0, j1 in zip(cuts[:-1], cuts[1:]):
        causal = j1 > q0 + 1  # slices wholly before the first query: every key visible, the non-causal path
        args = dict(target=target, causal=causal, q_offset=q0 if causal else 0, k_offset=j0 if causal else 0,
                    q_documents=q_docs, k_documents=docs[:, j0:j1].to(DEVICE))
        part = Partial(*triton_attention_partial(q_rows, k32[:, :, j0:j1], v32[:, :, j0:j1], scale, **args))
        empty = part.lse2 == float("-inf")
        assert (part.out[empty] == 0).all()
        assert (part.stat[empty] == (float("-inf") if target == "probs" else 0.0)).all()
        pieces.append((j0, j1, args, part, empty))
    assert any(p[4].any() for p in pieces) and not all(p[4].any() for p in pieces)
    merged = merge_partials([p[3] for p in pieces], target)
    merged_penalty = row_penalty(merged, target)
    assert rel_err(merged.out.double().cpu(), out[:, :, rows].detach()) <= 1e-5
    assert rel_err(merged_penalty.double().cpu(), penalty[:, :, rows].detach()) <= 1e-5

    go, gp = (t[:, :, rows].float().to(DEVICE) for t in (grad_out, grad_penalty))
    delta = score_grad_shift(merged.out, go, merged_penalty if target == "probs" else None, gp)
    dq, dks, dvs = 0, [], []
    for j0, j1, args, _, _ in pieces:
        dq_p, dk_p, dv_p = triton_attention_partial_backward(q_rows, k32[:, :, j0:j1], v32[:, :, j0:j1], go,
                                                             merged.lse2, delta, gp, scale, **args)
        dq, dks, dvs = dq + dq_p, dks + [dk_p], dvs + [dv_p]
    errors = {"dq": rel_err(dq.double().cpu(), ref_dq[:, :, rows]),
              "dk": rel_err(torch.cat(dks, 2).double().cpu(), ref_dk),
              "dv": rel_err(torch.cat(dvs, 2).double().cpu(), ref_dv)}
    assert max(errors.values()) <= 1e-5, errors


def test_triton_documents_bad_ids():
    q, k, v, _, _ = (t.float() for t in make_inputs(2, 2, 1, 8, 16))
    cases = {"expected \\[b, s\\] = \\[2, 8\\]": torch.zeros(1, 8, dtype=torch.long),
             "must be integers": torch.zeros(2, 8),
             "decrease": torch.tensor([[0, 0, 1, 0, 1, 1, 1, 1]] * 2)}
    for words, docs in cases.items():
        with pytest.raises(ValueError, match=words):
            triton_attention(q, k, v, 0.25, document_ids=docs.to(DEVICE))
    with pytest.raises(ValueError, match="q_documents and k_documents together"):
        triton_attention_partial(q, k, v, 0.25, q_documents=torch.zeros(2, 8, dtype=torch.long, device=DEVICE))
