"""Triton kernels of the fused FPA attention (FlashAttention-2 style); the autograd wrapper is triton_attention.py.

One program per (batch, head, tile). Scores are kept in base 2: t_ij = s_ij * log2(e), s_ij = scale * q_i . k_j,
so every exponential is an exp2. Per query row the forward keeps
    row_max    m_i = max_j t_ij                            (running, in base 2)
    row_sum    l_i = sum_j 2^(t_ij - m_i)
    row_sq_sum probs:  sum_j 2^(2 (t_ij - m_i)), rescaled by 2^(2 (m_old - m_new)) when the max moves,
                       so c_i = row_sq_sum / row_sum^2 = sum_j p_ij^2 at the end;
               logits: sum_j s_ij^2 over the visible keys (no rescaling)
and saves lse2_i = m_i + log2(l_i), the base-2 log-sum-exp (= the natural one times log2(e)): the backward
recomputes p_ij = 2^(t_ij - lse2_i) from it. (Why c_i = row_sq_sum / row_sum^2: docs/fpa_math.md section 3.)

Backward (g_i = incoming gradient of the row penalty, D_i = rowsum(dO_i * O_i) [+ 2 g_i c_i for probs]):
    probs:  dS_ij = p_ij (dP_ij + 2 g_i p_ij - D_i)
    logits: dS_ij = p_ij (dP_ij - D_i) + 2 g_i s_ij   (visible entries only)
with dP = dO V^T, dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO (docs/fpa_math.md section 2).
Two kernels and no atomics: dK/dV programs own a key tile (and sum the query heads of their GQA group in
registers), dQ programs own a query tile; both recompute S and dP, which keeps the results deterministic at
the price of two extra tile matmuls.

Key slices (context parallelism): with OFFSETS, seq_len queries attend to seq_len_k keys and query row i sees key
j iff j <= i + delta_pos (delta_pos = q_offset - k_offset), so a chunk of queries can run against any chunk of
keys; PARTIAL makes the forward store what merging needs (docs/fpa_math.md section 6). Without OFFSETS the
kernels compile exactly as plain self-attention.

Documents (HAS_DOCS): packed documents that attend only to themselves (attention/documents.py). The wrapper
turns the document ids into one contiguous range per row, RowLo/RowHi [b, seq_len] int32 (the keys [lo, hi)
query i sees: its document, cut at the causal limit), and per key, ColLo/ColHi [b, seq_len_k] (the query rows
that see it). Both are non-decreasing, so a query tile's keys lie in [lo of its first row, hi of its last row),
and the keys [lo of its last row, hi of its first row) are visible to every row of it: tiles there take the
unmasked path, the others are masked by the per-row range (equivalent to q_doc != k_doc or causal), and no
tile outside the union is visited (dK/dV: the same with the roles of rows and keys swapped). The causal and
offset bounds are inside the ranges; without HAS_DOCS the range pointers are unread and the kernels compile
as before.

Causal tile skipping: tiles entirely above the diagonal are never visited; tiles entirely below it (and inside
the sequence) run without any mask (MASKED=False); only the diagonal tiles and the sequence tail are masked.
That needs BLOCK_N | BLOCK_M for the forward and dQ (key tiles inside a query tile), BLOCK_M | BLOCK_N for dK/dV.

Interpreter (TRITON_INTERPRET=1): it stores bfloat16 as raw uint16 and its tl.dot multiplies those bit patterns
(triton-lang/triton#11584), so the operands of every tl.dot are cast to DOT_DTYPE: the input dtype when compiled
(a no-op), float32 when interpreted. Probabilities and dS are still rounded to the input dtype first, and bf16
values are exact in float32, so this changes only the order of the float32 accumulation, not what is rounded.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

INTERPRETING = bool(triton.knobs.runtime.interpret)  # read at the moment the kernels below are decorated
if INTERPRETING != isinstance(tl.sum, InterpretedFunction):  # triton.language's helpers: decorated at import
    raise ImportError("TRITON_INTERPRET changed after triton was first imported, so triton.language's own helpers "
                      "and these kernels would run in different modes: set it before anything imports triton "
                      "(megatron-core and deepspeed do)")

PENALTY_NONE = tl.constexpr(0)
PENALTY_PROBS = tl.constexpr(1)
PENALTY_LOGITS = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)


def dot_dtype(dtype) -> tl.dtype:
    """What the tl.dot operands are cast to for torch inputs of `dtype` (see the interpreter note above)."""
    if INTERPRETING:
        return tl.float32
    return {"torch.float32": tl.float32, "torch.bfloat16": tl.bfloat16, "torch.float16": tl.float16}[str(dtype)]


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _doc_tile_bounds(Lo, Hi, base, start, length, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """For the tile of BLOCK positions at `start` (of `length`) whose per-position ranges [Lo, Hi) (non-decreasing,
    int32 at Lo + base) are the other side's positions it sees: (first, full_start, full_end, end, lo, hi).
    Tiles of STEP in [first, min(full_start, end)) and [full_end, end) need the mask, [full_start, full_end)
    do not (visible to every position of the tile); lo, hi [BLOCK] per position (empty past `length`)."""
    positions = start + tl.arange(0, BLOCK)
    last = tl.minimum(start + BLOCK, length) - 1
    lo = tl.load(Lo + base + positions, mask=positions < length, other=0)
    hi = tl.load(Hi + base + positions, mask=positions < length, other=0)
    union_lo, union_hi = tl.load(Lo + base + start), tl.load(Hi + base + last)
    common_lo, common_hi = tl.load(Lo + base + last), tl.load(Hi + base + start)
    first = (union_lo // STEP) * STEP
    full_start = tl.maximum(((common_lo + STEP - 1) // STEP) * STEP, first)
    full_end = tl.maximum((common_hi // STEP) * STEP, full_start)
    return first, full_start, full_end, union_hi, lo, hi


@triton.jit
def _visible(rows, cols, seq_len_k, delta_pos, row_lo, row_hi, CAUSAL: tl.constexpr, OFFSETS: tl.constexpr,
             HAS_DOCS: tl.constexpr):
    """[BM, BN]: which (query row, key) entries of a masked tile are visible (key inside the sequence, causal,
    and with HAS_DOCS inside the row's range [row_lo, row_hi), which holds both)."""
    if HAS_DOCS:
        visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
    else:
        visible = cols[None, :] < seq_len_k  # [1, BN] -> [BM, BN]
        if CAUSAL and OFFSETS:
            visible = visible & (cols[None, :] <= rows[:, None] + delta_pos)
        elif CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
    return visible


@triton.jit
def _load_key_tile(q_tile, k_base, v_base, stride_ks, stride_vs, cols, dims, seq_len_k,
                   MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The K and V tiles [BN, D] at key positions cols (zeros past seq_len_k) and q . k [BM, BN], unscaled."""
    k_ptrs = k_base + cols[:, None] * stride_ks + dims[None, :]  # [BN, D]
    v_ptrs = v_base + cols[:, None] * stride_vs + dims[None, :]
    if MASKED:
        k_tile = tl.load(k_ptrs, mask=cols[:, None] < seq_len_k, other=0.0)
        v_tile = tl.load(v_ptrs, mask=cols[:, None] < seq_len_k, other=0.0)
    else:
        k_tile = tl.load(k_ptrs)
        v_tile = tl.load(v_ptrs)
    qk = tl.dot(q_tile.to(DOT_DTYPE), tl.trans(k_tile).to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return k_tile, v_tile, qk


@triton.jit
def _fwd_key_tiles(acc, row_max, row_sum, row_sq_sum, q_tile, k_base, v_base, stride_ks, stride_vs,
                   rows, dims, key_start, key_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PENALTY: tl.constexpr, MASKED: tl.constexpr,
                   OFFSETS: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online softmax of one query tile over the key tiles [key_start, key_end) (step BLOCK_N); query row i
    sees key j iff j <= i + delta_pos when causal (with OFFSETS; delta_pos = q_offset - k_offset), else j <= i;
    HAS_DOCS: iff row_lo_i <= j < row_hi_i."""
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BN] key positions
        k_tile, v_tile, qk = _load_key_tile(q_tile, k_base, v_base, stride_ks, stride_vs, cols, dims, seq_len_k,
                                            MASKED, DOT_DTYPE, DOT_PRECISION)  # [BN, D], [BN, D], [BM, BN]
        scores2 = qk * (softmax_scale * LOG2E)  # t_ij, base-2 scores
        if MASKED:
            visible = _visible(rows, cols, seq_len_k, delta_pos, row_lo, row_hi, CAUSAL, OFFSETS, HAS_DOCS)
            scores2 = tl.where(visible, scores2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores2, 1))  # [BM]
        if MASKED:  # a row with nothing visible yet keeps max 0: no (-inf) - (-inf) = NaN below
            new_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(scores2 - new_max[:, None])  # [BM, BN] unnormalized probabilities
        alpha = tl.math.exp2(row_max - new_max)  # rescales what was accumulated under the old max
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if PENALTY == PENALTY_PROBS:
            row_sq_sum = row_sq_sum * (alpha * alpha) + tl.sum(p * p, 1)
        elif PENALTY == PENALTY_LOGITS:
            scores = qk * softmax_scale
            if MASKED:
                scores = tl.where(visible, scores, 0.0)
            row_sq_sum += tl.sum(scores * scores, 1)
        p = p.to(v_tile.dtype)  # rounded to the input dtype, as FlashAttention does
        acc = tl.dot(p.to(DOT_DTYPE), v_tile.to(DOT_DTYPE), acc * alpha[:, None],
                     input_precision=DOT_PRECISION)  # [BM, D]
        row_max = new_max
    return acc, row_max, row_sum, row_sq_sum


@triton.jit
def attn_fwd_kernel(Q, K, V, Out, Lse2, RowPenalty, RowLo, RowHi,
                    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                    num_q_heads, group, seq_len, seq_len_k, delta_pos, softmax_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    PENALTY: tl.constexpr, OFFSETS: tl.constexpr, PARTIAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, b * hq). Writes Out [b, hq, s, d], Lse2 [b * hq, s] and RowPenalty [b * hq, s].

    OFFSETS: seq_len queries against seq_len_k keys, query row i seeing key j iff j <= i + delta_pos when
    causal; else self-attention (seq_len_k and delta_pos unread: compiled as before offsets existed).
    PARTIAL (one key slice of several, to be merged): RowPenalty gets the statistic that merges (probs:
    2 m + log2 row_sq_sum, the base-2 LSE of 2 t; logits: the sum), rows that see no key Out 0, Lse2 -inf.
    HAS_DOCS: query row i sees the keys [RowLo, RowHi) [b, seq_len] (its document, causal cut included)."""
    tile = tl.program_id(0)
    if CAUSAL:  # the last query tile has the longest key loop: start it first
        tile = tl.num_programs(0) - 1 - tile
    bh = tl.program_id(1)
    batch, head = bh // num_q_heads, bh % num_q_heads
    kv_head = head // group
    start_m = tile * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # [BM] query positions
    dims = tl.arange(0, HEAD_DIM)  # [D]; the last dim of every tensor is contiguous (the wrapper ensures it)

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q_tile = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=rows[:, None] < seq_len,
                     other=0.0)  # [BM, D]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # unnormalized output
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    row_sq_sum = tl.zeros([BLOCK_M], tl.float32)
    if not OFFSETS:
        seq_len_k = seq_len
    row_lo, row_hi = rows, rows  # unread without documents
    if HAS_DOCS:  # masked tiles [first, full_start) and [full_end, masked_end), unmasked in between
        first, full_start, full_end, masked_end, row_lo, row_hi = _doc_tile_bounds(
            RowLo, RowHi, batch.to(tl.int64) * seq_len, start_m, seq_len, BLOCK_M, BLOCK_N)
        acc, row_max, row_sum, row_sq_sum = _fwd_key_tiles(
            acc, row_max, row_sum, row_sq_sum, q_tile, k_base, v_base, stride_ks, stride_vs, rows, dims,
            first, tl.minimum(full_start, masked_end), seq_len_k, delta_pos, softmax_scale, row_lo, row_hi, BLOCK_N,
            CAUSAL, PENALTY, True, OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)
    elif CAUSAL and OFFSETS:  # key tiles left of the diagonal (keys j <= start_m + delta_pos): every entry visible
        full_start = 0
        full_end = tl.minimum((tl.maximum(start_m + delta_pos + 1, 0) // BLOCK_N) * BLOCK_N,
                              (seq_len_k // BLOCK_N) * BLOCK_N)
        masked_end = tl.minimum(start_m + BLOCK_M + delta_pos, seq_len_k)
    elif CAUSAL:
        full_start, full_end = 0, start_m  # key tiles left of the diagonal: every entry visible
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_start, full_end = 0, (seq_len_k // BLOCK_N) * BLOCK_N
        masked_end = seq_len_k
    acc, row_max, row_sum, row_sq_sum = _fwd_key_tiles(
        acc, row_max, row_sum, row_sq_sum, q_tile, k_base, v_base, stride_ks, stride_vs, rows, dims,
        full_start, full_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi, BLOCK_N, CAUSAL, PENALTY, False,
        OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)
    acc, row_max, row_sum, row_sq_sum = _fwd_key_tiles(
        acc, row_max, row_sum, row_sq_sum, q_tile, k_base, v_base, stride_ks, stride_vs, rows, dims,
        full_end, masked_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi, BLOCK_N, CAUSAL, PENALTY, True,
        OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)

    in_seq = rows < seq_len
    if HAS_DOCS and not PARTIAL:  # rows past the sequence end see no key (never stored): no 0 / 0
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    if PARTIAL:  # a row that sees no key of this slice: row_sum 0, out 0, LSE -inf
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    else:
        out = acc / row_sum[:, None]
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_os + dims[None, :], out.to(Out.dtype.element_ty),
             mask=in_seq[:, None])
    row_offset = bh.to(tl.int64) * seq_len + rows
    if PARTIAL:  # log2 of 1 where nothing was seen, then -inf (no log of 0)
        seen = row_sum > 0
        tl.store(Lse2 + row_offset, tl.where(seen, row_max + tl.math.log2(tl.where(seen, row_sum, 1.0)),
                                             float("-inf")), mask=in_seq)
    else:
        tl.store(Lse2 + row_offset, row_max + tl.math.log2(row_sum), mask=in_seq)
    if PENALTY == PENALTY_PROBS:
        if PARTIAL:
            tl.store(RowPenalty + row_offset, tl.where(
                seen, 2.0 * row_max + tl.math.log2(tl.where(seen, row_sq_sum, 1.0)), float("-inf")), mask=in_seq)
        else:
            tl.store(RowPenalty + row_offset, row_sq_sum / (row_sum * row_sum), mask=in_seq)
    elif PENALTY == PENALTY_LOGITS:
        tl.store(RowPenalty + row_offset, row_sq_sum, mask=in_seq)


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def attn_bwd_preprocess_kernel(Out, DOut, Collision, GradPenalty, Delta,
                               stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
                               num_q_heads, seq_len,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ADD_COLLISION: tl.constexpr):
    """Grid (query tiles, b * hq). Delta [b * hq, s] = rowsum(dO * O) (+ 2 g c for the probs penalty)."""
    bh = tl.program_id(1)
    batch, head = bh // num_q_heads, bh % num_q_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    dims = tl.arange(0, HEAD_DIM)
    in_seq = rows < seq_len
    o_tile = tl.load(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                     + rows[:, None] * stride_os + dims[None, :], mask=in_seq[:, None], other=0.0)
    do_tile = tl.load(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                      + rows[:, None] * stride_dos + dims[None, :], mask=in_seq[:, None], other=0.0)
    delta = tl.sum(o_tile.to(tl.float32) * do_tile.to(tl.float32), 1)  # [BM]
    row_offset = bh.to(tl.int64) * seq_len + rows
    if ADD_COLLISION:
        collision = tl.load(Collision + row_offset, mask=in_seq, other=0.0)
        grad_penalty = tl.load(GradPenalty + row_offset, mask=in_seq, other=0.0)
        delta += 2.0 * grad_penalty * collision
    tl.store(Delta + row_offset, delta, mask=in_seq)


@triton.jit
def _penalized_score_grad(p, dp, qk, delta, grad_penalty, visible, softmax_scale, PENALTY: tl.constexpr,
                          HAS_GRAD_PENALTY: tl.constexpr, MASKED: tl.constexpr):
    """dS of a tile (either orientation; delta and grad_penalty come broadcastable to it): the softmax
    backward p (dP - D), plus the penalty's terms with incoming gradient g per row: probs 2 g p^2,
    logits 2 g s on the visible entries."""
    if HAS_GRAD_PENALTY and PENALTY == PENALTY_PROBS:
        ds = p * (dp + 2.0 * grad_penalty * p - delta)
    else:
        ds = p * (dp - delta)
    if HAS_GRAD_PENALTY and PENALTY == PENALTY_LOGITS:
        extra = 2.0 * grad_penalty * (qk * softmax_scale)
        if MASKED:
            extra = tl.where(visible, extra, 0.0)
        ds += extra
    return ds


@triton.jit
def _dkdv_query_tiles(dk, dv, k_tile, v_tile, q_base, do_base, stride_qs, stride_dos, row_base,
                      Lse2, Delta, GradPenalty, cols, dims, row_start, row_end, seq_len, delta_pos, softmax_scale,
                      col_lo, col_hi, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, PENALTY: tl.constexpr,
                      HAS_GRAD_PENALTY: tl.constexpr, MASKED: tl.constexpr, OFFSETS: tl.constexpr,
                      HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV [BN, D] of one key tile over the query tiles [row_start, row_end) of one head.

    Works on transposed tiles ([keys, queries]) so that dK and dV come out of the matmuls as [BN, D].
    """
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # [BM]
        q_ptrs = q_base + rows[:, None] * stride_qs + dims[None, :]
        do_ptrs = do_base + rows[:, None] * stride_dos + dims[None, :]
        if MASKED:
            in_seq = rows < seq_len
            q_tile = tl.load(q_ptrs, mask=in_seq[:, None], other=0.0)  # [BM, D]
            do_tile = tl.load(do_ptrs, mask=in_seq[:, None], other=0.0)
            lse2 = tl.load(Lse2 + row_base + rows, mask=in_seq, other=0.0)  # [BM]
            delta = tl.load(Delta + row_base + rows, mask=in_seq, other=0.0)
        else:
            q_tile = tl.load(q_ptrs)
            do_tile = tl.load(do_ptrs)
            lse2 = tl.load(Lse2 + row_base + rows)
            delta = tl.load(Delta + row_base + rows)
        qk_t = tl.dot(k_tile.to(DOT_DTYPE), tl.trans(q_tile).to(DOT_DTYPE),
                      input_precision=DOT_PRECISION)  # [BN, BM] q . k, unscaled
        p_t = tl.math.exp2(qk_t * (softmax_scale * LOG2E) - lse2[None, :])  # [BN, BM] probabilities
        visible = True  # every entry, unless the tile is masked
        if MASKED:
            if HAS_DOCS:  # the query rows [col_lo, col_hi) see the key
                visible = (rows[None, :] >= col_lo[:, None]) & (rows[None, :] < col_hi[:, None])
            else:
                visible = rows[None, :] < seq_len
                if CAUSAL and OFFSETS:
                    visible = visible & (cols[:, None] <= rows[None, :] + delta_pos)
                elif CAUSAL:
                    visible = visible & (cols[:, None] <= rows[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do_tile.dtype).to(DOT_DTYPE), do_tile.to(DOT_DTYPE), dv,
                    input_precision=DOT_PRECISION)  # [BN, D] += P^T dO
        dp_t = tl.dot(v_tile.to(DOT_DTYPE), tl.trans(do_tile).to(DOT_DTYPE),
                      input_precision=DOT_PRECISION)  # [BN, BM] dP^T = V dO^T
        grad_penalty = 0.0
        if HAS_GRAD_PENALTY:
            if MASKED:
                grad_penalty = tl.load(GradPenalty + row_base + rows, mask=rows < seq_len, other=0.0)[None, :]
            else:
                grad_penalty = tl.load(GradPenalty + row_base + rows)[None, :]
        ds_t = _penalized_score_grad(p_t, dp_t, qk_t, delta[None, :], grad_penalty, visible, softmax_scale,
                                     PENALTY, HAS_GRAD_PENALTY, MASKED)  # [BN, BM]
        dk = tl.dot(ds_t.to(q_tile.dtype).to(DOT_DTYPE), q_tile.to(DOT_DTYPE), dk,
                    input_precision=DOT_PRECISION)  # [BN, D] += dS^T Q
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DOut, Lse2, Delta, GradPenalty, DK, DV, ColLo, ColHi,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                         stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                         num_q_heads, group, seq_len, seq_len_k, delta_pos, softmax_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, PENALTY: tl.constexpr, HAS_GRAD_PENALTY: tl.constexpr,
                         OFFSETS: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Grid (key tiles, b * hkv). dK, dV of one key tile, summed over the group's query heads and tiles.
    OFFSETS: seq_len queries, seq_len_k keys, query i sees key j iff j <= i + delta_pos when causal; else
    self-attention (seq_len_k and delta_pos unread). HAS_DOCS: key j is seen by the query rows
    [ColLo, ColHi) [b, seq_len_k] (its document, causal cut included)."""
    num_kv_heads = num_q_heads // group
    bh = tl.program_id(1)
    batch, kv_head = bh // num_kv_heads, bh % num_kv_heads
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # [BN] key positions
    dims = tl.arange(0, HEAD_DIM)
    if not OFFSETS:
        seq_len_k = seq_len
    col_in_seq = cols < seq_len_k
    k_tile = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                     + cols[:, None] * stride_ks + dims[None, :], mask=col_in_seq[:, None], other=0.0)  # [BN, D]
    v_tile = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                     + cols[:, None] * stride_vs + dims[None, :], mask=col_in_seq[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Query rows of this key tile: the query tiles from the one with the first row that sees key start_n
    # (row start_n - delta_pos) to the first that sees the whole tile hold the diagonal (masked when causal),
    # the rows below it up to the last full query tile need no mask, and the ragged tail of the queries is
    # masked. (Self-attention: the diagonal is rows [start_n, start_n + BN).)
    full_rows_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL and OFFSETS:
        diag_start = (tl.maximum(start_n - delta_pos, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.maximum(((start_n + BLOCK_N - 1 - delta_pos + BLOCK_M - 1) // BLOCK_M) * BLOCK_M,
                                diag_start)
        diag_end = tl.minimum(full_start, seq_len)
    elif CAUSAL:
        diag_start = start_n
        diag_end = tl.minimum(start_n + BLOCK_N, seq_len)
        full_start = start_n + BLOCK_N
    else:  # no diagonal: every query tile is visited
        full_start = 0
    tail_start = tl.maximum(full_start, full_rows_end)
    col_lo, col_hi = cols, cols  # unread without documents
    if HAS_DOCS:  # masked query tiles [first, full_start) and [full_rows_end, tail_end), unmasked in between
        first, full_start, full_rows_end, tail_end, col_lo, col_hi = _doc_tile_bounds(
            ColLo, ColHi, batch.to(tl.int64) * seq_len_k, start_n, seq_len_k, BLOCK_N, BLOCK_M)
        diag_start, diag_end, tail_start = first, tl.minimum(full_start, tail_end), full_rows_end
    else:
        tail_end = seq_len

    first_head = (kv_head * group).to(tl.int64)
    for head_in_group in range(group):
        head = first_head + head_in_group  # int64
        q_base = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
        do_base = DOut + batch.to(tl.int64) * stride_dob + head * stride_doh
        row_base = (batch.to(tl.int64) * num_q_heads + head) * seq_len
        if CAUSAL or HAS_DOCS:
            dk, dv = _dkdv_query_tiles(
                dk, dv, k_tile, v_tile, q_base, do_base, stride_qs, stride_dos, row_base, Lse2, Delta,
                GradPenalty, cols, dims, diag_start, diag_end, seq_len, delta_pos, softmax_scale, col_lo, col_hi,
                BLOCK_M, CAUSAL, PENALTY, HAS_GRAD_PENALTY, True, OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(
            dk, dv, k_tile, v_tile, q_base, do_base, stride_qs, stride_dos, row_base, Lse2, Delta,
            GradPenalty, cols, dims, full_start, full_rows_end, seq_len, delta_pos, softmax_scale, col_lo, col_hi,
            BLOCK_M, CAUSAL, PENALTY, HAS_GRAD_PENALTY, False, OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(
            dk, dv, k_tile, v_tile, q_base, do_base, stride_qs, stride_dos, row_base, Lse2, Delta,
            GradPenalty, cols, dims, tail_start, tail_end, seq_len, delta_pos, softmax_scale, col_lo, col_hi,
            BLOCK_M, CAUSAL, PENALTY, HAS_GRAD_PENALTY, True, OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)

    dk *= softmax_scale  # dS is the gradient of the scaled scores
    tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
             + cols[:, None] * stride_dks + dims[None, :], dk.to(DK.dtype.element_ty), mask=col_in_seq[:, None])
    tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
             + cols[:, None] * stride_dvs + dims[None, :], dv.to(DV.dtype.element_ty), mask=col_in_seq[:, None])


@triton.jit
def _dq_key_tiles(dq, q_tile, do_tile, lse2, delta, grad_penalty, k_base, v_base, stride_ks, stride_vs,
                  rows, dims, key_start, key_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PENALTY: tl.constexpr,
                  HAS_GRAD_PENALTY: tl.constexpr, MASKED: tl.constexpr, OFFSETS: tl.constexpr,
                  HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ [BM, D] of one query tile over the key tiles [key_start, key_end) (visibility as in
    `_fwd_key_tiles`)."""
    for start_n in range(key_start, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BN] key positions
        k_tile, v_tile, qk = _load_key_tile(q_tile, k_base, v_base, stride_ks, stride_vs, cols, dims, seq_len_k,
                                            MASKED, DOT_DTYPE, DOT_PRECISION)  # [BN, D], [BN, D], [BM, BN]
        p = tl.math.exp2(qk * (softmax_scale * LOG2E) - lse2[:, None])
        visible = True  # every entry, unless the tile is masked
        if MASKED:
            visible = _visible(rows, cols, seq_len_k, delta_pos, row_lo, row_hi, CAUSAL, OFFSETS, HAS_DOCS)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do_tile.to(DOT_DTYPE), tl.trans(v_tile).to(DOT_DTYPE),
                    input_precision=DOT_PRECISION)  # [BM, BN] dP = dO V^T
        ds = _penalized_score_grad(p, dp, qk, delta[:, None], grad_penalty, visible, softmax_scale,
                                   PENALTY, HAS_GRAD_PENALTY, MASKED)  # [BM, BN]
        dq = tl.dot(ds.to(k_tile.dtype).to(DOT_DTYPE), k_tile.to(DOT_DTYPE), dq,
                    input_precision=DOT_PRECISION)  # [BM, D] += dS K
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DOut, Lse2, Delta, GradPenalty, DQ, RowLo, RowHi,
                       stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                       stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                       stride_dqb, stride_dqh, stride_dqs,
                       num_q_heads, group, seq_len, seq_len_k, delta_pos, softmax_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PENALTY: tl.constexpr, HAS_GRAD_PENALTY: tl.constexpr,
                       OFFSETS: tl.constexpr, HAS_DOCS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Grid (query tiles, b * hq). dQ of one query tile (lengths and offsets as in the dK/dV kernel, documents
    as in the forward)."""
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    bh = tl.program_id(1)
    batch, head = bh // num_q_heads, bh % num_q_heads
    kv_head = head // group
    start_m = tile * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # [BM]
    dims = tl.arange(0, HEAD_DIM)
    in_seq = rows < seq_len
    q_tile = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                     + rows[:, None] * stride_qs + dims[None, :], mask=in_seq[:, None], other=0.0)  # [BM, D]
    do_tile = tl.load(DOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                      + rows[:, None] * stride_dos + dims[None, :], mask=in_seq[:, None], other=0.0)
    row_offset = bh.to(tl.int64) * seq_len + rows
    lse2 = tl.load(Lse2 + row_offset, mask=in_seq, other=0.0)  # [BM]
    delta = tl.load(Delta + row_offset, mask=in_seq, other=0.0)
    grad_penalty = 0.0
    if HAS_GRAD_PENALTY:
        grad_penalty = tl.load(GradPenalty + row_offset, mask=in_seq, other=0.0)[:, None]
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if not OFFSETS:
        seq_len_k = seq_len
    row_lo, row_hi = rows, rows  # unread without documents
    if HAS_DOCS:  # as in the forward
        first, full_start, full_end, masked_end, row_lo, row_hi = _doc_tile_bounds(
            RowLo, RowHi, batch.to(tl.int64) * seq_len, start_m, seq_len, BLOCK_M, BLOCK_N)
        dq = _dq_key_tiles(dq, q_tile, do_tile, lse2, delta, grad_penalty, k_base, v_base, stride_ks, stride_vs,
                           rows, dims, first, tl.minimum(full_start, masked_end), seq_len_k, delta_pos,
                           softmax_scale, row_lo, row_hi, BLOCK_N, CAUSAL, PENALTY, HAS_GRAD_PENALTY, True,
                           OFFSETS, HAS_DOCS, DOT_DTYPE, DOT_PRECISION)
    elif CAUSAL and OFFSETS:  # as in the forward
        full_start = 0
        full_end = tl.minimum((tl.maximum(start_m + delta_pos + 1, 0) // BLOCK_N) * BLOCK_N,
                              (seq_len_k // BLOCK_N) * BLOCK_N)
        masked_end = tl.minimum(start_m + BLOCK_M + delta_pos, seq_len_k)
    elif CAUSAL:
        full_start, full_end = 0, start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        full_start, full_end = 0, (seq_len_k // BLOCK_N) * BLOCK_N
        masked_end = seq_len_k
    dq = _dq_key_tiles(dq, q_tile, do_tile, lse2, delta, grad_penalty, k_base, v_base, stride_ks, stride_vs,
                       rows, dims, full_start, full_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi,
                       BLOCK_N, CAUSAL, PENALTY, HAS_GRAD_PENALTY, False, OFFSETS, HAS_DOCS, DOT_DTYPE,
                       DOT_PRECISION)
    dq = _dq_key_tiles(dq, q_tile, do_tile, lse2, delta, grad_penalty, k_base, v_base, stride_ks, stride_vs,
                       rows, dims, full_end, masked_end, seq_len_k, delta_pos, softmax_scale, row_lo, row_hi,
                       BLOCK_N, CAUSAL, PENALTY, HAS_GRAD_PENALTY, True, OFFSETS, HAS_DOCS, DOT_DTYPE,
                       DOT_PRECISION)
    dq *= softmax_scale
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
             + rows[:, None] * stride_dqs + dims[None, :], dq.to(DQ.dtype.element_ty), mask=in_seq[:, None])
