"""Causal attention with the exact FPA penalty in O(S) memory (a flash-style kernel in plain torch).

The eager path materializes every head's [s, s] probabilities to square them. `blockwise_attention`
computes the same output, the same per-row penalty and the same gradients tile by tile:

- forward: query blocks (`block_size` rows) in the outer loop, key tiles (up to `key_block_size` keys) up to
  the diagonal in the inner loop (keys that the causal mask hides entirely are never computed), with an
  online softmax that keeps per row the running max, the normalizer `row_sum = sum_j 2^(s_ij - max)` and,
  for the penalty, `row_sq_sum = sum_j 2^(2 (s_ij - max))`. The collision term is then
  c_i = row_sq_sum / row_sum^2 = sum_j p_ij^2 (the LSE identity, docs/fpa_math.md section 3).
  Only the inputs, the output, the log-sum-exp and c are saved.
- backward: recomputes each tile's probabilities from the saved log-sum-exp and adds the penalty's terms
  to dP and D (docs/fpa_math.md section 2), for an arbitrary upstream gradient g of the per-row penalty.

Scores are kept in base-2 units (q is scaled by softmax_scale * log2(e)), so every exponential is an
`exp2`: the same probabilities, and on CPU about half the time of `exp`, the largest elementwise cost here.

Layout: grouped-query attention folds the query heads of one key/value head into the rows,
q [b, hkv * group, s, d] -> [b * hkv, s * group, d] (row r = position r // group, head r % group), so every
tile is one plain batched matmul over all (b, hkv), and dK = dS^T Q sums over the group by itself.
Tiles are computed in float32 (float64 for float64 inputs), whatever the input dtype. On CPU, narrow query
blocks against wide key tiles were fastest at one thread (few large matmuls and few Python-level ops;
benchmarks/train_throughput.py --long); the memory stays O(block_size x key_block_size) per (batch, head).

The reference is `eager_attention` (attention_penalty.py): explicit [b, h, s, s] scores, masked softmax.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fpa_megatron.model.attention_penalty import TARGETS, eager_attention  # noqa: F401  (eager: the reference)


# Query rows per block and keys per tile: narrow query blocks against wide key tiles were the fastest at one
# thread per process (64 x 2048: 1.04x the time of torch's fused SDPA at S = 2048, d = 32, fwd + bwd with the
# penalty, benchmarks/attention_memory.py; 128- and 256-query blocks were slower).
DEFAULT_BLOCK_SIZE = 64  # the default of model.attention_block_size too
KEY_BLOCK_SIZE = 2048
LOG2E = math.log2(math.e)  # natural -> base-2 units: exp(x) = 2^(x * LOG2E)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# layout and tiles


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


def _base2_query_rows(q: Tensor, softmax_scale: float, group: int, acc: torch.dtype) -> Tensor:
    """q [b, hq, s, d] as folded rows [n, s * group, d] in acc, scaled by softmax_scale * log2(e): q . k is then
    the score in base-2 units. Forward and backward both build it (the backward recomputes, saving memory)."""
    return _fold_heads(q.to(acc) * (softmax_scale * LOG2E), group)


class _Tiles:
    """The query blocks and key tiles of one call, and the causal mask of the diagonal block.

    Query block [i0, i1) (folded rows [i0 * group, i1 * group)) attends to keys [0, i1) when causal (later
    keys are never computed), else [0, s), cut every key_block keys; key_block is a multiple of the block, so
    the causal diagonal [i0, i1) always lies at the end of the block's last key tile.
    """

    def __init__(self, s: int, group: int, causal: bool, block: int, key_block: int, dtype, device):
        self.s, self.group, self.causal, self.block, self.key_block = s, group, causal, block, key_block
        self.dtype, self.device = dtype, device
        self._future: dict = {}

    def blocks(self):
        """(i0, i1, key tiles [(j0, j1), ...]) per query block; the last block may be shorter."""
        for i0 in range(0, self.s, self.block):
            i1 = min(i0 + self.block, self.s)
            end = i1 if self.causal else self.s
            yield i0, i1, [(j, min(j + self.key_block, end)) for j in range(0, end, self.key_block)]

    def diagonal(self, i0: int, i1: int, j0: int, j1: int) -> Optional[int]:
        """Column of key tile [j0, j1) where the causal diagonal block starts, None if the tile has none."""
        return i0 - j0 if self.causal and j1 == i1 else None

    def future(self, size: int) -> tuple[Tensor, Tensor]:
        """The diagonal block's [size * group, size] causal mask: True on the keys in each row's future, and
        the same as an additive bias (0 / -inf; adding it is several times cheaper than masked_fill_)."""
        if size not in self._future:
            mask = torch.ones(size, size, dtype=torch.bool, device=self.device).triu(1)
            mask = mask.repeat_interleave(self.group, dim=0)
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(mask, float("-inf"))
            self._future[size] = mask, bias
        return self._future[size]


# ----------------------------------------------------------------------------------------------------------
# one query block, forward and backward


def _sq_sum(x: Tensor) -> Tensor:
    """sum over the last dim of x^2, [n, rows, 1]: one fused pass, no [n, rows, cols] temporary."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()


def _visible_sq_sum(scores: Tensor, diag: Optional[int], future: Tensor) -> Tensor:
    """sum of scores^2 over the keys each row sees, [n, rows, 1]; `future` masks the diagonal block."""
    if diag is None:
        return _sq_sum(scores)
    return _sq_sum(scores[:, :, :diag]) + _sq_sum(scores[:, :, diag:].masked_fill(future, 0.0))


def _forward_block(q_tile: Tensor, k_t: Tensor, v: Tensor, i0: int, i1: int, key_tiles, tiles: _Tiles,
                   target: Optional[str]):
    """Output [n, rows, d], base-2 log-sum-exp [n, rows, 1] and row penalty [n, rows, 1] (None when target is
    None) of one query block, online over its key tiles. q_tile [n, rows, d] is in base-2 units."""
    n, rows, d = q_tile.shape
    row_max = torch.full((n, rows, 1), float("-inf"), dtype=q_tile.dtype, device=q_tile.device)
    row_sum = torch.zeros_like(row_max)
    row_sq_sum = torch.zeros_like(row_max)  # probs: sum_j 2^(2 (s - max)); logits: sum_j s^2 (base-2 units)
    out = torch.zeros(n, rows, d, dtype=q_tile.dtype, device=q_tile.device)
    for j0, j1 in key_tiles:
        scores = torch.bmm(q_tile, k_t[:, :, j0:j1])  # [n, rows, cols]
        diag = tiles.diagonal(i0, i1, j0, j1)
        if target == "logits":
            row_sq_sum += _visible_sq_sum(scores, diag, tiles.future(i1 - i0)[0])
        if diag is not None:
            scores[:, :, diag:].add_(tiles.future(i1 - i0)[1])  # -inf on the keys in the future
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        probs = scores.sub_(new_max).exp2_()  # unnormalized probabilities, in place
        rescale = torch.exp2(row_max - new_max)  # what was accumulated under the old max
        row_sum.mul_(rescale).add_(probs.sum(-1, keepdim=True))
        out.mul_(rescale).baddbmm_(probs, v[:, j0:j1])
        if target == "probs":
            row_sq_sum.mul_(rescale.square()).add_(_sq_sum(probs))
        row_max = new_max
    if target == "probs":
        penalty = row_sq_sum / row_sum.square()
    else:
        penalty = row_sq_sum / LOG2E ** 2 if target == "logits" else None
    return out.div_(row_sum), row_max + torch.log2(row_sum), penalty


def _backward_block(q_tile, out_grad_tile, lse_tile, d_tile, g2_tile, k, k_t, v_t, dk, dv, i0, i1, key_tiles,
                    tiles: _Tiles, target: Optional[str]) -> Tensor:
    """dQ [n, rows, d] of one query block (unscaled: times softmax_scale later); adds its share to dk, dv.
    Rows: q_tile in base-2 units, out_grad_tile dO, lse_tile base-2 LSE, d_tile D (+ 2 g c for probs),
    g2_tile 2 g of the penalty (None without it). dS = P (dP + 2 g P - D'); for logits dS += 2 g S."""
    dq_tile = torch.zeros_like(q_tile)
    for j0, j1 in key_tiles:
        scores = torch.bmm(q_tile, k_t[:, :, j0:j1])  # recomputed [n, rows, cols]
        diag = tiles.diagonal(i0, i1, j0, j1)
        if target == "logits":
            score_grad = scores * (g2_tile / LOG2E)  # 2 g s in natural units; masked entries zeroed below
        probs = scores.sub_(lse_tile)
        if diag is not None:
            probs[:, :, diag:].add_(tiles.future(i1 - i0)[1])
        probs = probs.exp2_()  # [n, rows, cols]
        dv[:, j0:j1].baddbmm_(probs.transpose(1, 2), out_grad_tile)
        probs_grad = torch.bmm(out_grad_tile, v_t[:, :, j0:j1])  # dP
        if target == "probs":
            probs_grad.addcmul_(probs, g2_tile)  # + 2 g p
        scores_grad = probs_grad.sub_(d_tile).mul_(probs)  # dS = p (dP - D)
        if target == "logits":
            scores_grad.add_(score_grad)
            if diag is not None:
                scores_grad[:, :, diag:].masked_fill_(tiles.future(i1 - i0)[0], 0.0)
        dq_tile.baddbmm_(scores_grad, k[:, j0:j1])
        dk[:, j0:j1].baddbmm_(scores_grad.transpose(1, 2), q_tile)
    return dq_tile


# ----------------------------------------------------------------------------------------------------------
# the autograd function


class BlockwiseAttention(torch.autograd.Function):
    """The tiled forward and backward; see `blockwise_attention` for the arguments."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, target: str,
                compute_penalty: bool, block_size: int, causal: bool, key_block: int):
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        # float32 (or float64) copies, [n = b * hkv, rows, d]; the scale and log2(e) folded into q once.
        q_rows = _base2_query_rows(q, softmax_scale, group, acc)  # [n, s * group, d]
        k_t = k.to(acc).reshape(-1, s, d).transpose(1, 2)  # [n, d, s]
        v_rows = v.to(acc).reshape(-1, s, d)  # [n, s, d]
        out, lse = torch.empty_like(q_rows), torch.empty(q_rows.shape[:2], dtype=acc, device=q.device)
        penalty = torch.empty_like(lse) if compute_penalty else None
        tiles = _Tiles(s, group, causal, block_size, key_block, acc, q.device)
        block_target = target if compute_penalty else None

        for i0, i1, key_tiles in tiles.blocks():
            r0, r1 = i0 * group, i1 * group  # the block's folded rows
            out_t, lse_t, penalty_t = _forward_block(q_rows[:, r0:r1], k_t, v_rows, i0, i1, key_tiles, tiles,
                                                     block_target)
            out[:, r0:r1], lse[:, r0:r1] = out_t, lse_t.squeeze(-1)
            if penalty is not None:
                penalty[:, r0:r1] = penalty_t.squeeze(-1)

        out = _unfold_heads(out, b, group).to(q.dtype)  # [b, hq, s, d]
        if penalty is not None:
            penalty = _unfold_heads(penalty, b, group)  # [b, hq, s]
        # The collision term c enters the backward (D' = D + 2 g c); for logits nothing more is needed.
        ctx.save_for_backward(q, k, v, out, lse, penalty if block_target == "probs" else None)
        ctx.softmax_scale, ctx.target, ctx.causal = softmax_scale, target, causal
        ctx.block_size, ctx.key_block, ctx.compute_penalty = block_size, key_block, compute_penalty
        ctx.set_materialize_grads(False)
        return out, penalty

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_penalty: Optional[Tensor]):
        q, k, v, out, lse, collision = ctx.saved_tensors
        scale, target = ctx.softmax_scale, ctx.target
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        g = grad_penalty if ctx.compute_penalty else None
        if grad_out is None and g is None:
            return (None,) * 9
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        q_rows = _base2_query_rows(q, scale, group, acc)  # [n, s * group, d]
        k_rows = k.to(acc).reshape(-1, s, d)
        k_t = k_rows.transpose(1, 2)  # [n, d, s]
        v_t = v.to(acc).reshape(-1, s, d).transpose(1, 2)  # [n, d, s]
        out_grad = _fold_heads(grad_out.to(acc), group)  # [n, s * group, d]
        # D_i = rowsum(dO * O); the probs penalty adds 2 g_i c_i to it (and 2 g_i p_ij to dP_ij).
        d_rows = torch.linalg.vecdot(out_grad, _fold_heads(out.to(acc), group))  # [n, s * group]
        g2_rows = None
        if g is not None:
            g2_rows = _fold_heads(2.0 * g.to(acc), group)  # [n, s * group]
            if target == "probs":
                d_rows = d_rows.addcmul_(g2_rows, _fold_heads(collision, group))
        dq = torch.empty_like(q_rows)
        dk = torch.zeros_like(k_rows)
        dv = torch.zeros_like(k_rows)
        tiles = _Tiles(s, group, ctx.causal, ctx.block_size, ctx.key_block, acc, q.device)
        block_target = target if g is not None else None

        for i0, i1, key_tiles in tiles.blocks():
            r0, r1 = i0 * group, i1 * group
            dq[:, r0:r1] = _backward_block(
                q_rows[:, r0:r1], out_grad[:, r0:r1], lse[:, r0:r1, None], d_rows[:, r0:r1, None],
                None if g2_rows is None else g2_rows[:, r0:r1, None], k_rows, k_t, v_t,
                dk, dv, i0, i1, key_tiles, tiles, block_target)

        dq = _unfold_heads(dq.mul_(scale), b, group).to(q.dtype)
        dk = dk.mul_(1.0 / LOG2E).reshape(k.shape).to(k.dtype)  # dS^T Q used q in base-2 units
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
