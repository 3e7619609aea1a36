"""Causal attention with the exact FPA penalty in O(S) memory (a flash-style kernel in plain torch).

The eager path materializes every head's [s, s] probabilities to square them. `blockwise_attention`
computes the same output, the same per-row penalty and the same gradients tile by tile:

- forward: query blocks in the outer loop, key blocks up to the diagonal in the inner loop (tiles that the
  causal mask hides entirely are never computed), with an online softmax that keeps per row the running
  max m, the normalizer l = sum_j exp(s_ij - m) and, for the penalty, q2 = sum_j exp(2 (s_ij - m)).
  The collision term is then c_i = q2_i / l_i^2 = sum_j p_ij^2 (the LSE identity, docs/fpa_math.md section 3).
  Only the inputs, the output, the log-sum-exp and c are saved.
- backward: recomputes each tile's probabilities from the saved log-sum-exp and adds the penalty's terms
  to dP and D (docs/fpa_math.md section 2), for an arbitrary upstream gradient g of the per-row penalty.

Layout: grouped-query attention folds the query heads of one key/value head into the rows,
q [b, hkv * group, s, d] -> [b * hkv, s * group, d] (row r = position r // group, head r % group), so every
tile is one plain batched matmul over all (b, hkv), and dK = dS^T Q sums over the group by itself.
Tiles are computed in float32 (float64 for float64 inputs), whatever the input dtype.

The reference is `eager_attention` (attention_penalty.py): explicit [b, h, s, s] scores, masked softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fpa_megatron.model.attention_penalty import TARGETS, eager_attention  # noqa: F401  (eager: the reference)


DEFAULT_BLOCK_SIZE = 256  # fastest on CPU in benchmarks/attention_memory.py (128 pays Python overhead per tile)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# blockwise kernel


def _fold_heads(x: Tensor, group: int) -> Tensor:
    """[b, hkv * group, s, ...] -> [b * hkv, s * group, ...]: the query heads of a GQA group become rows."""
    b, hq, s = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, hq // group, group, s, *rest)
    if group > 1:
        x = x.transpose(2, 3)  # [b, hkv, s, group, ...]
    return x.reshape(b * (hq // group), s * group, *rest)


def _unfold_heads(x: Tensor, b: int, group: int) -> Tensor:
    """Inverse of `_fold_heads`: [b * hkv, s * group, ...] -> [b, hkv * group, s, ...]."""
    n, rows = x.shape[:2]
    rest = x.shape[2:]
    hkv, s = n // b, rows // group
    x = x.reshape(b, hkv, s, group, *rest)
    if group > 1:
        x = x.transpose(2, 3)
    return x.reshape(b, hkv * group, s, *rest)


def _blocks(s: int, block: int):
    """(start, end) of the tiles along a sequence of length s; the last one may be shorter."""
    return [(i, min(i + block, s)) for i in range(0, s, block)]


def _diagonal_mask(size: int, group: int, device) -> Tensor:
    """[size * group, size] bool, True where the key is in the future of the row's query (diagonal tile)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1).repeat_interleave(group, dim=0)


def _cached_mask(cache: dict, size: int, group: int, device) -> Tensor:
    if size not in cache:
        cache[size] = _diagonal_mask(size, group, device)
    return cache[size]


class BlockwiseAttention(torch.autograd.Function):
    """The tiled forward and backward; see `blockwise_attention` for the arguments."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, target: str,
                compute_penalty: bool, block_size: int, causal: bool):
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        # Scale folded into q once; float32 (or float64) copies of the inputs, [n = b * hkv, rows, d].
        qs = _fold_heads(q.to(acc) * softmax_scale, group)  # [n, s * group, d]
        kf = k.to(acc).reshape(-1, s, d)  # [n, s, d]
        vf = v.to(acc).reshape(-1, s, d)
        n = kf.shape[0]
        out = torch.empty(n, s * group, d, dtype=acc, device=q.device)
        lse = torch.empty(n, s * group, dtype=acc, device=q.device)
        penalty = torch.empty(n, s * group, dtype=acc, device=q.device) if compute_penalty else None
        blocks = _blocks(s, block_size)
        masks = {}

        for qi, (i0, i1) in enumerate(blocks):
            r0, r1 = i0 * group, i1 * group
            q_t = qs[:, r0:r1]  # [n, rows, d]
            m = l = q2 = o = None  # running max, normalizer, sum of squared exponentials, output [n, rows(, d)]
            last = qi if causal else len(blocks) - 1
            for kj in range(last + 1):
                j0, j1 = blocks[kj]
                st = torch.bmm(q_t, kf[:, j0:j1].transpose(1, 2))  # scores [n, rows, cols]
                if compute_penalty and target == "logits":  # sum of s^2 over unmasked keys
                    sq = torch.linalg.vecdot(st, st) if not (causal and kj == qi) else None
                if causal and kj == qi:
                    mask = _cached_mask(masks, i1 - i0, group, q.device)
                    if compute_penalty and target == "logits":
                        z = st.masked_fill(mask, 0.0)
                        sq = torch.linalg.vecdot(z, z)
                    st.masked_fill_(mask, float("-inf"))
                m_tile = st.amax(-1)  # [n, rows]
                m_new = m_tile if m is None else torch.maximum(m, m_tile)
                p = st.sub_(m_new.unsqueeze(-1)).exp_()  # unnormalized probabilities, in place
                l_tile = p.sum(-1)
                if m is None:
                    l, o = l_tile, torch.bmm(p, vf[:, j0:j1])
                    if compute_penalty:
                        q2 = torch.linalg.vecdot(p, p) if target == "probs" else sq
                else:
                    alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
                    l = l.mul_(alpha).add_(l_tile)
                    o = o.mul_(alpha.unsqueeze(-1)).baddbmm_(p, vf[:, j0:j1])
                    if compute_penalty:
                        if target == "probs":
                            q2 = q2.mul_(alpha.square()).add_(torch.linalg.vecdot(p, p))
                        else:
                            q2 = q2.add_(sq)
                m = m_new
            out[:, r0:r1] = o / l.unsqueeze(-1)
            lse[:, r0:r1] = m + torch.log(l)
            if compute_penalty:
                penalty[:, r0:r1] = q2 / l.square() if target == "probs" else q2

        out = _unfold_heads(out, b, group).to(q.dtype)  # [b, hq, s, d]
        if penalty is not None:
            penalty = _unfold_heads(penalty, b, group)  # [b, hq, s]
        # The collision term c enters the backward (D' = D + 2 g c); for logits nothing more is needed.
        saved_penalty = penalty if (compute_penalty and target == "probs") else None
        ctx.save_for_backward(q, k, v, out, lse, saved_penalty)
        ctx.softmax_scale, ctx.target, ctx.block_size, ctx.causal = softmax_scale, target, block_size, causal
        ctx.compute_penalty = compute_penalty
        ctx.set_materialize_grads(False)
        if penalty is not None:
            return out, penalty
        return out, None

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_penalty: Optional[Tensor]):
        q, k, v, out, lse, collision = ctx.saved_tensors
        scale, target, causal = ctx.softmax_scale, ctx.target, ctx.causal
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        g = grad_penalty if ctx.compute_penalty else None
        if grad_out is None and g is None:
            return (None,) * 8
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        qs = _fold_heads(q.to(acc) * scale, group)  # [n, s * group, d]
        kf = k.to(acc).reshape(-1, s, d)
        vf = v.to(acc).reshape(-1, s, d)
        do = _fold_heads(grad_out.to(acc), group)  # [n, s * group, d]
        # D_i = rowsum(dO * O); the probs penalty adds 2 g_i c_i to it (and 2 g_i p_ij to dP_ij).
        D = torch.linalg.vecdot(do, _fold_heads(out.to(acc), group))  # [n, s * group]
        g2 = None
        if g is not None:
            g2 = _fold_heads(2.0 * g.to(acc), group)  # [n, s * group]
            if target == "probs":
                D = D.addcmul_(g2, _fold_heads(collision, group))
        dq = torch.zeros_like(qs)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        blocks = _blocks(s, ctx.block_size)
        masks = {}

        for qi, (i0, i1) in enumerate(blocks):
            r0, r1 = i0 * group, i1 * group
            q_t, do_t = qs[:, r0:r1], do[:, r0:r1]  # [n, rows, d]
            lse_t, D_t = lse[:, r0:r1].unsqueeze(-1), D[:, r0:r1].unsqueeze(-1)  # [n, rows, 1]
            g2_t = g2[:, r0:r1].unsqueeze(-1) if g2 is not None else None
            dq_t = None
            last = qi if causal else len(blocks) - 1
            for kj in range(last + 1):
                j0, j1 = blocks[kj]
                k_t, v_t = kf[:, j0:j1], vf[:, j0:j1]  # [n, cols, d]
                st = torch.bmm(q_t, k_t.transpose(1, 2))  # recomputed scores [n, rows, cols]
                diagonal = causal and kj == qi
                if diagonal:
                    mask = _cached_mask(masks, i1 - i0, group, q.device)
                if g2_t is not None and target == "logits":
                    ds_extra = st * g2_t  # 2 g_i s_ij (masked entries zeroed below)
                p = st.sub_(lse_t)
                if diagonal:
                    p.masked_fill_(mask, float("-inf"))
                p = p.exp_()  # probabilities [n, rows, cols]
                dv[:, j0:j1] += torch.bmm(p.transpose(1, 2), do_t)
                dp = torch.bmm(do_t, v_t.transpose(1, 2))  # [n, rows, cols]
                if g2_t is not None and target == "probs":
                    dp = dp.addcmul_(p, g2_t)  # + 2 g_i p_ij
                ds = dp.sub_(D_t).mul_(p)  # p (dP - D)
                if g2_t is not None and target == "logits":
                    ds = ds.add_(ds_extra)
                    if diagonal:
                        ds.masked_fill_(mask, 0.0)
                dq_t = torch.bmm(ds, k_t) if dq_t is None else dq_t.baddbmm_(ds, k_t)
                dk[:, j0:j1] += torch.bmm(ds.transpose(1, 2), q_t)  # scale is already in q_t
            dq[:, r0:r1] = dq_t

        dq = _unfold_heads(dq.mul_(scale), b, group).to(q.dtype)
        dk = dk.reshape(k.shape).to(k.dtype)
        dv = dv.reshape(v.shape).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                        compute_penalty: bool = True, block_size: int = 128,
                        causal: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Attention and its per-row FPA penalty, tile by tile, in O(s) memory.

    q: [b, hq, s, d]; k, v: [b, hkv, s, d] (hq % hkv == 0, GQA). Returns (out [b, hq, s, d] in q's dtype,
    row_penalty [b, hq, s] float32 (float64 for float64 inputs) or None when compute_penalty=False).
    row_penalty: probs: c_i = sum_j p_ij^2; logits: sum over unmasked j of s_ij^2, s_ij = scale * q_i . k_j.
    It is differentiable with any upstream gradient. Equals `eager_attention` up to rounding.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [b, hq, s, d] and k, v [b, hkv, s, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same b, s, d and hq % hkv == 0")
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    out, row_penalty = BlockwiseAttention.apply(q, k, v, float(softmax_scale), target, bool(compute_penalty),
                                                int(block_size), bool(causal))
    return out, row_penalty
