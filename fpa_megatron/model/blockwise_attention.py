"""Causal attention with the exact FPA penalty in O(S) memory (a flash-style kernel in plain torch).

The eager path materializes every head's [s, s] probabilities to square them. `blockwise_attention`
computes the same output, the same per-row penalty and the same gradients tile by tile:

- forward: query blocks (`block_size` rows) in the outer loop, key tiles (up to `key_block_size` keys) up to
  the diagonal in the inner loop (keys that the causal mask hides entirely are never computed), with an
  online softmax that keeps per row the running max m, the normalizer l = sum_j exp(s_ij - m) and, for the
  penalty, q2 = sum_j exp(2 (s_ij - m)).
  The collision term is then c_i = q2_i / l_i^2 = sum_j p_ij^2 (the LSE identity, docs/fpa_math.md section 3).
  Only the inputs, the output, the log-sum-exp and c are saved.
- backward: recomputes each tile's probabilities from the saved log-sum-exp and adds the penalty's terms
  to dP and D (docs/fpa_math.md section 2), for an arbitrary upstream gradient g of the per-row penalty.

Layout: grouped-query attention folds the query heads of one key/value head into the rows,
q [b, hkv * group, s, d] -> [b * hkv, s * group, d] (row r = position r // group, head r % group), so every
tile is one plain batched matmul over all (b, hkv), and dK = dS^T Q sums over the group by itself.
Tiles are computed in float32 (float64 for float64 inputs), whatever the input dtype. On CPU, narrow query
blocks against wide key tiles were fastest at one thread (few large matmuls and few Python-level ops;
benchmarks/train_throughput.py --long); the memory stays O(block_size x key_block_size) per (batch, head).

The reference is `eager_attention` (attention_penalty.py): explicit [b, h, s, s] scores, masked softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fpa_megatron.model.attention_penalty import TARGETS, eager_attention  # noqa: F401  (eager: the reference)


# Query rows per block and keys per tile: narrow query blocks against wide key tiles were the fastest at one
# thread per process (64 x 2048: 1.0-1.2x the time of torch's fused SDPA at S = 1024-2048, fwd + bwd with the
# penalty; square 128 x 128 tiles: 1.25-1.3x; benchmarks/train_throughput.py --long for the whole step).
DEFAULT_BLOCK_SIZE = 64  # the default of model.attention_block_size too
KEY_BLOCK_SIZE = 2048


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
    """(start, end) of the query blocks along a sequence of length s; the last one may be shorter."""
    return [(i, min(i + block, s)) for i in range(0, s, block)]


def _key_tiles(i0: int, i1: int, s: int, causal: bool, key_block: int):
    """(start, end) of the key tiles that query block [i0, i1) attends to: keys [0, i1) when causal (later
    keys are never computed), else [0, s), cut every key_block keys. key_block is a multiple of the query
    block, so the causal diagonal [i0, i1) always lies at the end of the last tile."""
    end = i1 if causal else s
    return [(j, min(j + key_block, end)) for j in range(0, end, key_block)]


def _diagonal_mask(size: int, group: int, device) -> Tensor:
    """[size * group, size] bool, True where the key is in the future of the row's query (diagonal tile)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1).repeat_interleave(group, dim=0)


class _DiagonalMasks:
    """The diagonal tile's causal mask per tile size, as a bool mask and as an additive bias (0 / -inf):
    adding the bias is one vectorized pass, several times cheaper than masked_fill_ with a broadcast mask."""

    def __init__(self, group: int, dtype: torch.dtype, device):
        self.group, self.dtype, self.device = group, dtype, device
        self._masks: dict = {}
        self._biases: dict = {}

    def mask(self, size: int) -> Tensor:
        if size not in self._masks:
            self._masks[size] = _diagonal_mask(size, self.group, self.device)
        return self._masks[size]

    def bias(self, size: int) -> Tensor:
        if size not in self._biases:
            zeros = torch.zeros(size * self.group, size, dtype=self.dtype, device=self.device)
            self._biases[size] = zeros.masked_fill_(self.mask(size), float("-inf"))
        return self._biases[size]


class BlockwiseAttention(torch.autograd.Function):
    """The tiled forward and backward; see `blockwise_attention` for the arguments."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, target: str,
                compute_penalty: bool, block_size: int, causal: bool, key_block: int):
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        # Scale folded into q once; float32 (or float64) copies of the inputs, [n = b * hkv, rows, d].
        qs = _fold_heads(q.to(acc) * softmax_scale, group)  # [n, s * group, d]
        kT = k.to(acc).reshape(-1, s, d).transpose(1, 2)  # [n, d, s]
        vf = v.to(acc).reshape(-1, s, d)  # [n, s, d]
        n = vf.shape[0]
        out = torch.empty(n, s * group, d, dtype=acc, device=q.device)
        lse = torch.empty(n, s * group, dtype=acc, device=q.device)
        penalty = torch.empty(n, s * group, dtype=acc, device=q.device) if compute_penalty else None
        masks = _DiagonalMasks(group, acc, q.device)
        logits_penalty = compute_penalty and target == "logits"
        probs_penalty = compute_penalty and target == "probs"

        for i0, i1 in _blocks(s, block_size):
            r0, r1 = i0 * group, i1 * group
            q_t = qs[:, r0:r1]  # [n, rows, d]
            m = l = q2 = o = None  # running max, normalizer, sum of squared exponentials, output [n, rows(, d)]
            for j0, j1 in _key_tiles(i0, i1, s, causal, key_block):
                st = torch.bmm(q_t, kT[:, :, j0:j1])  # scores [n, rows, cols]
                diagonal = st[:, :, i0 - j0:] if causal and j1 == i1 else None  # the causal diagonal, a view
                if logits_penalty:  # sum of s^2 over unmasked keys
                    sq = torch.linalg.vector_norm(st if diagonal is None else st[:, :, :i0 - j0], dim=-1,
                                                  keepdim=True).square_()
                    if diagonal is not None:
                        unmasked = diagonal.masked_fill(masks.mask(i1 - i0), 0.0)
                        sq += torch.linalg.vector_norm(unmasked, dim=-1, keepdim=True).square_()
                if diagonal is not None:
                    diagonal.add_(masks.bias(i1 - i0))  # -inf on the keys in the future
                m_tile = st.amax(-1, keepdim=True)  # [n, rows, 1]
                m_new = m_tile if m is None else torch.maximum(m, m_tile)
                p = st.sub_(m_new).exp_()  # unnormalized probabilities, in place
                l_tile = p.sum(-1, keepdim=True)
                if probs_penalty:  # sum_j p_ij^2 as a squared norm: one fused pass, no [n, rows, cols] temporary
                    sq = torch.linalg.vector_norm(p, dim=-1, keepdim=True).square_()
                if m is None:
                    l, o, q2 = l_tile, torch.bmm(p, vf[:, j0:j1]), (sq if compute_penalty else None)
                else:
                    alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
                    l = l.mul_(alpha).add_(l_tile)
                    o = o.mul_(alpha).baddbmm_(p, vf[:, j0:j1])
                    if probs_penalty:
                        q2 = q2.mul_(alpha.square()).add_(sq)
                    elif logits_penalty:
                        q2 = q2.add_(sq)
                m = m_new
            out[:, r0:r1] = o.div_(l)
            lse[:, r0:r1] = (m + torch.log(l)).squeeze(-1)
            if compute_penalty:
                penalty[:, r0:r1] = (q2 / l.square() if probs_penalty else q2).squeeze(-1)

        out = _unfold_heads(out, b, group).to(q.dtype)  # [b, hq, s, d]
        if penalty is not None:
            penalty = _unfold_heads(penalty, b, group)  # [b, hq, s]
        # The collision term c enters the backward (D' = D + 2 g c); for logits nothing more is needed.
        saved_penalty = penalty if probs_penalty else None
        ctx.save_for_backward(q, k, v, out, lse, saved_penalty)
        ctx.softmax_scale, ctx.target, ctx.causal = softmax_scale, target, causal
        ctx.block_size, ctx.key_block, ctx.compute_penalty = block_size, key_block, compute_penalty
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
            return (None,) * 9
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        qs = _fold_heads(q.to(acc) * scale, group)  # [n, s * group, d]
        kf = k.to(acc).reshape(-1, s, d)
        vf = v.to(acc).reshape(-1, s, d)
        kT, vT = kf.transpose(1, 2), vf.transpose(1, 2)  # [n, d, s]
        do = _fold_heads(grad_out.to(acc), group)  # [n, s * group, d]
        # D_i = rowsum(dO * O); the probs penalty adds 2 g_i c_i to it (and 2 g_i p_ij to dP_ij).
        D = torch.linalg.vecdot(do, _fold_heads(out.to(acc), group))  # [n, s * group]
        g2 = None
        if g is not None:
            g2 = _fold_heads(2.0 * g.to(acc), group)  # [n, s * group]
            if target == "probs":
                D = D.addcmul_(g2, _fold_heads(collision, group))
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        masks = _DiagonalMasks(group, acc, q.device)

        for i0, i1 in _blocks(s, ctx.block_size):
            r0, r1 = i0 * group, i1 * group
            q_t, do_t = qs[:, r0:r1], do[:, r0:r1]  # [n, rows, d]
            lse_t, D_t = lse[:, r0:r1].unsqueeze(-1), D[:, r0:r1].unsqueeze(-1)  # [n, rows, 1]
            g2_t = g2[:, r0:r1].unsqueeze(-1) if g2 is not None else None
            dq_t = None
            for j0, j1 in _key_tiles(i0, i1, s, causal, ctx.key_block):
                st = torch.bmm(q_t, kT[:, :, j0:j1])  # recomputed scores [n, rows, cols]
                diagonal = causal and j1 == i1  # the tile's last i1 - i0 keys are the causal diagonal
                if g2_t is not None and target == "logits":
                    ds_extra = st * g2_t  # 2 g_i s_ij (masked entries zeroed below)
                p = st.sub_(lse_t)
                if diagonal:
                    p[:, :, i0 - j0:].add_(masks.bias(i1 - i0))
                p = p.exp_()  # probabilities [n, rows, cols]
                dv[:, j0:j1].baddbmm_(p.transpose(1, 2), do_t)
                dp = torch.bmm(do_t, vT[:, :, j0:j1])  # [n, rows, cols]
                if g2_t is not None and target == "probs":
                    dp = dp.addcmul_(p, g2_t)  # + 2 g_i p_ij
                ds = dp.sub_(D_t).mul_(p)  # p (dP - D)
                if g2_t is not None and target == "logits":
                    ds = ds.add_(ds_extra)
                    if diagonal:
                        ds[:, :, i0 - j0:].masked_fill_(masks.mask(i1 - i0), 0.0)
                dq_t = torch.bmm(ds, kf[:, j0:j1]) if dq_t is None else dq_t.baddbmm_(ds, kf[:, j0:j1])
                dk[:, j0:j1].baddbmm_(ds.transpose(1, 2), q_t)  # scale is already in q_t
            dq[:, r0:r1] = dq_t

        dq = _unfold_heads(dq.mul_(scale), b, group).to(q.dtype)
        dk = dk.reshape(k.shape).to(k.dtype)
        dv = dv.reshape(v.shape).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                        compute_penalty: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, causal: bool = True,
                        key_block_size: int = KEY_BLOCK_SIZE) -> tuple[Tensor, Optional[Tensor]]:
    """Attention and its per-row FPA penalty, tile by tile, in O(s) memory.

    Tiles are `block_size` queries by up to `key_block_size` keys (rounded down to a multiple of block_size,
    at least one block): temporaries of n x block_size x key_block_size values, whatever s.

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
    if block_size < 1 or key_block_size < 1:
        raise ValueError(f"block_size={block_size}, key_block_size={key_block_size}: must be >= 1")
    key_block = max(key_block_size // block_size, 1) * block_size
    out, row_penalty = BlockwiseAttention.apply(q, k, v, float(softmax_scale), target, bool(compute_penalty),
                                                int(block_size), bool(causal), key_block)
    return out, row_penalty
