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

The reference is `eager_attention` (reference.py): explicit [b, h, s, s] scores, masked softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fpa_megatron.attention.documents import check_document_ids, key_ranges
from fpa_megatron.attention.partial import LOG2E
from fpa_megatron.options import FPA_TARGETS, require_one_of

# Query rows per block and keys per tile: narrow query blocks against wide key tiles were the fastest at one
# thread per process (64 x 2048: 1.04x the time of torch's fused SDPA at S = 2048, d = 32, fwd + bwd with the
# penalty, benchmarks/attention_memory.py; 128- and 256-query blocks were slower).
DEFAULT_BLOCK_SIZE = 64  # the default of model.attention_block_size too
KEY_BLOCK_SIZE = 2048


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
    """The query blocks and key tiles of one call (or of one sample, with documents), and the masks of the tiles
    that cross the diagonal or a document boundary.

    Queries and keys may be different slices of one sequence: query row i (0 <= i < sq) sits `delta` positions
    after key j = i (delta = q_offset - k_offset; 0 for self-attention), so with causal masking it sees key j iff
    j <= i + delta. Query block [i0, i1) (folded rows [i0 * group, i1 * group)) attends to keys
    [0, min(sk, i1 + delta)) when causal (later keys are never computed; a block that sees no key has no tile),
    else [0, sk), cut every key_block keys. Keys j <= i0 + delta are visible to every row of the block.
    `documents` (q_docs [sq], k_docs [sk] of one sample, documents.py): a row also sees only the keys of its own
    document, so each block's keys start at its first row's document (`key_ranges`).
    """

    def __init__(self, sq: int, sk: int, group: int, causal: bool, block: int, key_block: int, dtype, device,
                 delta: int = 0, documents: Optional[tuple[Tensor, Tensor]] = None):
        self.sq, self.sk, self.delta = sq, sk, delta
        self.group, self.causal, self.block, self.key_block = group, causal, block, key_block
        self.dtype, self.device = dtype, device
        self._future: dict = {}
        self.documents = documents
        if documents is not None:
            q_docs, k_docs = documents
            lo, hi = key_ranges(q_docs[None], k_docs[None], block, causal=causal, delta=delta)
            self._ranges = list(zip(lo[0].tolist(), hi[0].tolist()))
            self._q_docs, self._k_docs = q_docs.tolist(), k_docs.tolist()

    def blocks(self):
        """(i0, i1, key tiles [(j0, j1), ...]) per query block; the last block may be shorter."""
        for n, i0 in enumerate(range(0, self.sq, self.block)):
            i1 = min(i0 + self.block, self.sq)
            if self.documents is not None:
                start, end = self._ranges[n]
            else:
                start, end = 0, min(self.sk, i1 + self.delta) if self.causal else self.sk
            yield i0, i1, [(j, min(j + self.key_block, end)) for j in range(start, end, self.key_block)]

    def has_empty_rows(self, i0: int) -> bool:
        """Whether some rows of the block starting at i0 may see no key of a tile (keys start after them; with
        documents, a tile of another document's keys only)."""
        if self.documents is not None:
            return True
        return self.causal and i0 + self.delta < 0

    def diagonal(self, i0: int, i1: int, j0: int, j1: int):
        """(first column of key tile [j0, j1) that some row of block [i0, i1) must not see, the [rows, cols]
        mask of the columns from there on (True = hidden: in the row's future or another document), the same
        as an additive bias, or None for a document tile's mask, applied with masked_fill_), or None when every
        row sees the whole tile."""
        if self.documents is not None and not (
                self._q_docs[i0] == self._q_docs[i1 - 1] == self._k_docs[j0] == self._k_docs[j1 - 1]):
            return (0, *self._document_tile(i0, i1, j0, j1))
        if not self.causal or j1 <= i0 + self.delta + 1:
            return None
        start = max(i0 + self.delta - j0, 0)
        shift = i0 + self.delta - j0 - start  # 0 on the diagonal; < 0 when the tile starts after row i0's keys
        return (start, *self.future(i1 - i0, j1 - j0 - start, shift))

    def _document_tile(self, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, None]:
        """The mask of a tile that holds a document boundary (other documents, and the future); no bias."""
        q_docs, k_docs = self.documents
        mask = q_docs[i0:i1, None] != k_docs[None, j0:j1]
        if self.causal:
            mask |= torch.ones(mask.shape, dtype=torch.bool, device=self.device).triu(1 + i0 + self.delta - j0)
        return mask.repeat_interleave(self.group, dim=0), None

    def future(self, size: int, cols: int, shift: int) -> tuple[Tensor, Tensor]:
        """The [size * group, cols] causal mask of query rows [0, size) against columns [0, cols) whose first
        column is row 0's (shift + 1)-th key: True where column > row + shift. Also as an additive bias (0 / -inf;
        adding it is several times cheaper than masked_fill_)."""
        key = (size, cols, shift)
        if key not in self._future:
            mask = torch.ones(size, cols, dtype=torch.bool, device=self.device).triu(1 + shift)
            mask = mask.repeat_interleave(self.group, dim=0)
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(mask, float("-inf"))
            self._future[key] = mask, bias
        return self._future[key]


def _sample_tiles(sq: int, sk: int, b: int, hkv: int, q_docs: Optional[Tensor], k_docs: Optional[Tensor],
                  **tiles_args) -> list[tuple[slice, _Tiles]]:
    """The folded rows [n = b * hkv] and their tiles: all at once without documents; one sample at a time with
    them (each sample has its own boundaries, so its own tiles)."""
    if q_docs is None:
        return [(slice(None), _Tiles(sq, sk, **tiles_args))]
    return [(slice(i * hkv, (i + 1) * hkv), _Tiles(sq, sk, documents=(q_docs[i], k_docs[i]), **tiles_args))
            for i in range(b)]


# ----------------------------------------------------------------------------------------------------------
# one query block, forward and backward


def _hide(scores: Tensor, diag) -> None:
    """-inf, in place, on the columns `diag` (from `_Tiles.diagonal`) hides: by adding the cached causal bias, or
    with the document tile's mask (built per tile: no bias tensor, a quarter of the memory)."""
    start, mask, bias = diag
    if bias is None:
        scores[:, :, start:].masked_fill_(mask, float("-inf"))
    else:
        scores[:, :, start:].add_(bias)


def _sq_sum(x: Tensor) -> Tensor:
    """sum over the last dim of x^2, [n, rows, 1]: one fused pass, no [n, rows, cols] temporary."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()


def _visible_sq_sum(scores: Tensor, diag) -> Tensor:
    """sum of scores^2 over the keys each row sees, [n, rows, 1]; `diag` from `_Tiles.diagonal`."""
    if diag is None:
        return _sq_sum(scores)
    start, future, _ = diag
    return _sq_sum(scores[:, :, :start]) + _sq_sum(scores[:, :, start:].masked_fill(future, 0.0))


def _forward_block(q_tile: Tensor, k_t: Tensor, v: Tensor, i0: int, i1: int, key_tiles, tiles: _Tiles,
                   target: Optional[str]):
    """Online softmax of one query block over its key tiles: (out [n, rows, d] normalized, row_max, row_sum,
    row_sq_sum [n, rows, 1]). q_tile [n, rows, d] is in base-2 units; row_sq_sum is sum_j 2^(2 (s - max)) for
    probs, sum_j s^2 (base-2 units) for logits, zeros for None. Rows that see no key: out 0, row_max -inf."""
    n, rows, d = q_tile.shape
    row_max = torch.full((n, rows, 1), float("-inf"), dtype=q_tile.dtype, device=q_tile.device)
    row_sum = torch.zeros_like(row_max)
    row_sq_sum = torch.zeros_like(row_max)
    out = torch.zeros(n, rows, d, dtype=q_tile.dtype, device=q_tile.device)
    empty_rows = tiles.has_empty_rows(i0)
    for j0, j1 in key_tiles:
        scores = torch.bmm(q_tile, k_t[:, :, j0:j1])  # [n, rows, cols]
        diag = tiles.diagonal(i0, i1, j0, j1)
        if target == "logits":
            row_sq_sum += _visible_sq_sum(scores, diag)
        if diag is not None:
            _hide(scores, diag)  # -inf on the keys in the future (or of other documents)
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        # a row with nothing visible yet keeps max -inf; it subtracts 0 instead (no (-inf) - (-inf) = NaN)
        ref_max = new_max.masked_fill(new_max == float("-inf"), 0.0) if empty_rows else new_max
        probs = scores.sub_(ref_max).exp2_()  # unnormalized probabilities, in place
        rescale = torch.exp2(row_max - ref_max)  # what was accumulated under the old max
        row_sum.mul_(rescale).add_(probs.sum(-1, keepdim=True))
        out.mul_(rescale).baddbmm_(probs, v[:, j0:j1])
        if target == "probs":
            row_sq_sum.mul_(rescale.square()).add_(_sq_sum(probs))
        row_max = new_max
    if empty_rows or not key_tiles:
        return out.div_(row_sum.masked_fill(row_sum == 0, 1.0)), row_max, row_sum, row_sq_sum
    return out.div_(row_sum), row_max, row_sum, row_sq_sum


def _backward_block(q_tile, out_grad_tile, lse_tile, d_tile, g2_tile, k, k_t, v_t, dk, dv, i0, i1, key_tiles,
                    tiles: _Tiles, target: Optional[str]) -> Tensor:
    """dQ [n, rows, d] of one query block (unscaled: times softmax_scale later); adds its share to dk, dv.
    Rows: q_tile in base-2 units, out_grad_tile dO, lse_tile base-2 LSE (finite: over all the keys the row
    sees, also those outside k), d_tile D (+ 2 g c for probs), g2_tile 2 g of the penalty (None without it).
    dS = P (dP + 2 g P - D'); for logits dS += 2 g S."""
    dq_tile = torch.zeros_like(q_tile)
    for j0, j1 in key_tiles:
        scores = torch.bmm(q_tile, k_t[:, :, j0:j1])  # recomputed [n, rows, cols]
        diag = tiles.diagonal(i0, i1, j0, j1)
        if target == "logits":
            score_grad = scores * (g2_tile / LOG2E)  # 2 g s in natural units; masked entries zeroed below
        probs = scores.sub_(lse_tile)
        if diag is not None:
            _hide(probs, diag)
        probs = probs.exp2_()  # [n, rows, cols]
        dv[:, j0:j1].baddbmm_(probs.transpose(1, 2), out_grad_tile)
        probs_grad = torch.bmm(out_grad_tile, v_t[:, :, j0:j1])  # dP
        if target == "probs":
            probs_grad.addcmul_(probs, g2_tile)  # + 2 g p
        scores_grad = probs_grad.sub_(d_tile).mul_(probs)  # dS = p (dP - D)
        if target == "logits":
            scores_grad.add_(score_grad)
            if diag is not None:
                scores_grad[:, :, diag[0]:].masked_fill_(diag[1], 0.0)
        dq_tile.baddbmm_(scores_grad, k[:, j0:j1])
        dk[:, j0:j1].baddbmm_(scores_grad.transpose(1, 2), q_tile)
    return dq_tile


# ----------------------------------------------------------------------------------------------------------
# all query blocks of one call, forward and backward (the autograd function and the partial API share these)


def _forward_rows(q_rows: Tensor, k_t: Tensor, v_rows: Tensor, parts: list[tuple[slice, _Tiles]],
                  target: Optional[str]):
    """Every query block of folded rows q_rows [n, sq * group, d] (base-2 units) against k_t [n, d, sk],
    v_rows [n, sk, d], each part of the n rows on its own tiles (`_sample_tiles`): (out [n, rows, d], row_max,
    row_sum, row_sq_sum [n, rows]) as in `_forward_block`."""
    out = torch.empty_like(q_rows)
    row_max, row_sum, row_sq_sum = (torch.empty(q_rows.shape[:2], dtype=q_rows.dtype, device=q_rows.device)
                                    for _ in range(3))
    for n, tiles in parts:
        group = tiles.group
        for i0, i1, key_tiles in tiles.blocks():
            r0, r1 = i0 * group, i1 * group  # the block's folded rows
            out_t, max_t, sum_t, sq_sum_t = _forward_block(q_rows[n, r0:r1], k_t[n], v_rows[n], i0, i1, key_tiles,
                                                           tiles, target)
            out[n, r0:r1] = out_t
            row_max[n, r0:r1], row_sum[n, r0:r1], row_sq_sum[n, r0:r1] = (
                max_t.squeeze(-1), sum_t.squeeze(-1), sq_sum_t.squeeze(-1))
    return out, row_max, row_sum, row_sq_sum


def _backward_rows(q_rows, out_grad, lse_rows, d_rows, g2_rows, k_rows, v_rows, parts: list[tuple[slice, _Tiles]],
                   target: Optional[str]):
    """(dq [n, rows, d] unscaled, dk [n, sk, d] in base-2 units of q, dv [n, sk, d]) of every query block;
    the row tensors as in `_backward_block`, [n, rows] (g2_rows None without a penalty gradient)."""
    k_t = k_rows.transpose(1, 2)  # [n, d, sk]
    v_t = v_rows.transpose(1, 2)  # [n, d, sk]
    dq = torch.zeros_like(q_rows)
    dk = torch.zeros_like(k_rows)
    dv = torch.zeros_like(k_rows)
    for n, tiles in parts:
        group = tiles.group
        dk_n, dv_n = dk[n], dv[n]  # views: the blocks accumulate into them
        for i0, i1, key_tiles in tiles.blocks():
            r0, r1 = i0 * group, i1 * group
            dq[n, r0:r1] = _backward_block(
                q_rows[n, r0:r1], out_grad[n, r0:r1], lse_rows[n, r0:r1, None], d_rows[n, r0:r1, None],
                None if g2_rows is None else g2_rows[n, r0:r1, None], k_rows[n], k_t[n], v_t[n],
                dk_n, dv_n, i0, i1, key_tiles, tiles, target)
    return dq, dk, dv


def _shift_terms(grad_out: Tensor, out: Tensor, grad_penalty: Optional[Tensor], collision: Optional[Tensor],
                 group: int, acc: torch.dtype):
    """Folded rows of dO, D' = rowsum(dO * O) (+ 2 g c for the probs penalty: pass its c as `collision`) and
    2 g (None without a penalty gradient), from [b, hq, s, ...] tensors."""
    out_grad = _fold_heads(grad_out.to(acc), group)  # [n, s * group, d]
    d_rows = torch.linalg.vecdot(out_grad, _fold_heads(out.to(acc), group))  # [n, s * group]
    g2_rows = None
    if grad_penalty is not None:
        g2_rows = _fold_heads(2.0 * grad_penalty.to(acc), group)  # [n, s * group]
        if collision is not None:
            d_rows = d_rows.addcmul_(g2_rows, _fold_heads(collision.to(acc), group))
    return out_grad, d_rows, g2_rows


# ----------------------------------------------------------------------------------------------------------
# the autograd function


class BlockwiseAttention(torch.autograd.Function):
    """The tiled forward and backward; see `blockwise_attention` for the arguments."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, target: str,
                compute_penalty: bool, block_size: int, causal: bool, key_block: int, docs: Optional[Tensor]):
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        # float32 (or float64) copies, [n = b * hkv, rows, d]; the scale and log2(e) folded into q once.
        q_rows = _base2_query_rows(q, softmax_scale, group, acc)  # [n, s * group, d]
        k_t = k.to(acc).reshape(-1, s, d).transpose(1, 2)  # [n, d, s]
        v_rows = v.to(acc).reshape(-1, s, d)  # [n, s, d]
        parts = _sample_tiles(s, s, b, k.shape[1], docs, docs, group=group, causal=causal, block=block_size,
                              key_block=key_block, dtype=acc, device=q.device)
        block_target = target if compute_penalty else None
        out, row_max, row_sum, row_sq_sum = _forward_rows(q_rows, k_t, v_rows, parts, block_target)
        lse = row_max + torch.log2(row_sum)  # base 2
        penalty = None
        if block_target == "probs":
            penalty = _unfold_heads(row_sq_sum / row_sum.square(), b, group)  # [b, hq, s]: c = q / l^2
        elif block_target == "logits":
            penalty = _unfold_heads(row_sq_sum / LOG2E ** 2, b, group)

        out = _unfold_heads(out, b, group).to(q.dtype)  # [b, hq, s, d]
        # The collision term c enters the backward (D' = D + 2 g c); for logits nothing more is needed.
        ctx.save_for_backward(q, k, v, out, lse, penalty if block_target == "probs" else None, docs)
        ctx.softmax_scale, ctx.target, ctx.causal = softmax_scale, target, causal
        ctx.block_size, ctx.key_block, ctx.compute_penalty = block_size, key_block, compute_penalty
        ctx.set_materialize_grads(False)
        return out, penalty

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_penalty: Optional[Tensor]):
        q, k, v, out, lse, collision, docs = ctx.saved_tensors
        scale, target = ctx.softmax_scale, ctx.target
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        acc = _acc_dtype(q.dtype)
        g = grad_penalty if ctx.compute_penalty else None
        if grad_out is None and g is None:
            return (None,) * 10
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        q_rows = _base2_query_rows(q, scale, group, acc)  # [n, s * group, d]
        # D_i = rowsum(dO * O); the probs penalty adds 2 g_i c_i to it (and 2 g_i p_ij to dP_ij).
        out_grad, d_rows, g2_rows = _shift_terms(grad_out, out, g, collision if target == "probs" else None,
                                                 group, acc)
        parts = _sample_tiles(s, s, b, k.shape[1], docs, docs, group=group, causal=ctx.causal,
                              block=ctx.block_size, key_block=ctx.key_block, dtype=acc, device=q.device)
        dq, dk, dv = _backward_rows(q_rows, out_grad, lse, d_rows, g2_rows, k.to(acc).reshape(-1, s, d),
                                    v.to(acc).reshape(-1, s, d), parts, target if g is not None else None)
        dq = _unfold_heads(dq.mul_(scale), b, group).to(q.dtype)
        dk = dk.mul_(1.0 / LOG2E).reshape(k.shape).to(k.dtype)  # dS^T Q used q in base-2 units
        dv = dv.reshape(v.shape).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                        compute_penalty: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, causal: bool = True,
                        key_block_size: int = KEY_BLOCK_SIZE, document_ids: Optional[Tensor] = None
                        ) -> tuple[Tensor, Optional[Tensor]]:
    """Attention and its per-row FPA penalty, tile by tile, in O(s) memory.

    Tiles are `block_size` queries by up to `key_block_size` keys (rounded down to a multiple of block_size,
    at least one block): temporaries of n x block_size x key_block_size values, whatever s.

    q: [b, hq, s, d]; k, v: [b, hkv, s, d] (hq % hkv == 0, GQA). Returns (out [b, hq, s, d] in q's dtype,
    row_penalty [b, hq, s] float32 (float64 for float64 inputs) or None when compute_penalty=False).
    row_penalty: probs: c_i = sum_j p_ij^2; logits: sum over unmasked j of s_ij^2, s_ij = scale * q_i . k_j.
    It is differentiable with any upstream gradient. Equals `eager_attention` up to rounding.
    document_ids [b, s] (documents.py): each row sees only its own document's keys; every tile outside a block's
    documents is skipped, so the work follows the sum of the squared document lengths.
    """
    require_one_of("target", target, FPA_TARGETS)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [b, hq, s, d] and k, v [b, hkv, s, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same b, s, d and hq % hkv == 0")
    check_document_ids(document_ids, q.shape[0], q.shape[2])
    key_block = _key_block(block_size, key_block_size)
    out, row_penalty = BlockwiseAttention.apply(q, k, v, float(softmax_scale), target, bool(compute_penalty),
                                                int(block_size), bool(causal), key_block, document_ids)
    return out, row_penalty


# ----------------------------------------------------------------------------------------------------------
# one slice of the keys, for merging (context parallelism): no autograd, the caller owns the backward


def _key_block(block_size: int, key_block_size: int) -> int:
    if block_size < 1 or key_block_size < 1:
        raise ValueError(f"block_size={block_size}, key_block_size={key_block_size}: must be >= 1")
    return max(key_block_size // block_size, 1) * block_size


def blockwise_attention_partial(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *,
                                target: Optional[str] = None, causal: bool = True, q_offset: int = 0,
                                k_offset: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                                key_block_size: int = KEY_BLOCK_SIZE, q_documents: Optional[Tensor] = None,
                                k_documents: Optional[Tensor] = None):
    """Attention of the queries q [b, hq, sq, d] (global positions q_offset + i) against one slice of the keys
    k, v [b, hkv, sk, d] (positions k_offset + j), with the statistics that merge it with other slices.

    Causal: query i sees key j iff k_offset + j <= q_offset + i; blocks and tiles that see nothing are skipped.
    q_documents [b, sq], k_documents [b, sk] (both or neither): the document ids of these queries and keys; a
    query also sees only the keys of its own document.
    Returns (out [b, hq, sq, d] float32 (float64 for float64 inputs), normalized over this slice;
    lse2 [b, hq, sq] float64, log2 sum_j 2^(t_ij) over the keys the row sees here (t = s * log2 e; -inf when
    none); stat [b, hq, sq] float64: probs: log2 sum_j 2^(2 t_ij); logits: sum_j s_ij^2; None for target None).
    The statistics are O(s): float64 costs nothing and keeps LSE(2s) - 2 LSE(s) exact at large logits.
    """
    b, hq, sq, d = q.shape
    sk, group, acc = k.shape[2], hq // k.shape[1], _acc_dtype(q.dtype)
    q_rows = _base2_query_rows(q, softmax_scale, group, acc)  # [n, sq * group, d]
    k_t = k.to(acc).reshape(-1, sk, d).transpose(1, 2)  # [n, d, sk]
    v_rows = v.to(acc).reshape(-1, sk, d)  # [n, sk, d]
    parts = _sample_tiles(sq, sk, b, k.shape[1], q_documents, k_documents, group=group, causal=causal,
                          block=block_size, key_block=_key_block(block_size, key_block_size), dtype=acc,
                          device=q.device, delta=q_offset - k_offset)
    out, row_max, row_sum, row_sq_sum = _forward_rows(q_rows, k_t, v_rows, parts, target)
    row_max = row_max.double()
    lse2 = row_max + torch.log2(row_sum.double())
    stat = None
    if target == "probs":
        stat = 2.0 * row_max + torch.log2(row_sq_sum.double())
    elif target == "logits":
        stat = row_sq_sum.double() / LOG2E ** 2
    if stat is not None:
        stat = _unfold_heads(stat, b, group)
    return _unfold_heads(out, b, group), _unfold_heads(lse2, b, group), stat


def blockwise_attention_partial_backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse2: Tensor,
                                         delta: Tensor, grad_penalty: Optional[Tensor], softmax_scale: float, *,
                                         target: Optional[str] = None, causal: bool = True, q_offset: int = 0,
                                         k_offset: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                                         key_block_size: int = KEY_BLOCK_SIZE, q_documents: Optional[Tensor] = None,
                                         k_documents: Optional[Tensor] = None):
    """(dq, dk, dv) of one slice (arguments as `blockwise_attention_partial`), given the merged row statistics
    [b, hq, sq]: lse2 the base-2 LSE over all the keys the row sees (finite), delta = rowsum(dO * O) (+ 2 g c
    for probs) with the merged O and c, grad_penalty g (None: no penalty term). dq [b, hq, sq, d] and dk, dv
    [b, hkv, sk, d] in the accumulation dtype; the slices' dq add up to the exact dq."""
    b, hq, sq, d = q.shape
    sk, group, acc = k.shape[2], hq // k.shape[1], _acc_dtype(q.dtype)
    q_rows = _base2_query_rows(q, softmax_scale, group, acc)
    parts = _sample_tiles(sq, sk, b, k.shape[1], q_documents, k_documents, group=group, causal=causal,
                          block=block_size, key_block=_key_block(block_size, key_block_size), dtype=acc,
                          device=q.device, delta=q_offset - k_offset)
    g2_rows = None if grad_penalty is None else _fold_heads(2.0 * grad_penalty.to(acc), group)
    dq, dk, dv = _backward_rows(q_rows, _fold_heads(grad_out.to(acc), group), _fold_heads(lse2.to(acc), group),
                                _fold_heads(delta.to(acc), group), g2_rows, k.to(acc).reshape(-1, sk, d),
                                v.to(acc).reshape(-1, sk, d), parts, target if grad_penalty is not None else None)
    dq = _unfold_heads(dq.mul_(softmax_scale), b, group)
    return dq, dk.mul_(1.0 / LOG2E).reshape(k.shape), dv.reshape(v.shape)
