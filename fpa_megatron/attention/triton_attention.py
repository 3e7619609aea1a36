"""Causal attention with the exact FPA penalty as fused Triton kernels (the GPU path of the penalized attention).

`triton_attention` computes what `blockwise_attention` and `eager_attention` compute -- the output, and per
query row the penalty (probs: c_i = sum_j p_ij^2; logits: sum over visible j of s_ij^2) -- in three kernels
(triton_kernels.py): a FlashAttention-2 forward that also keeps each row's running sum of squared
exponentials, and a backward that recomputes the tiles from the saved log-sum-exp and adds the penalty's
terms to dS for any incoming gradient of the row penalty. Memory is O(s): nothing of size [s, s] exists.

The kernels run compiled on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1
set before the kernels module is imported; the tests do this when CUDA is absent). Tile sizes: a short
autotune list per head dim on the GPU (Hopper-sized), one small fixed set under the interpreter.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fpa_megatron.attention.documents import check_document_ids, key_ranges
from fpa_megatron.options import FPA_TARGETS, require_one_of

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
MIN_DOT_DIM = 16  # tl.dot needs every dimension >= 16: smaller head dims are zero-padded up to it
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (batch x heads)

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dQ: query tile BLOCK_M, key tile BLOCK_N, with
# BLOCK_N | BLOCK_M; dK/dV: key tile BLOCK_N, query tile BLOCK_M, with BLOCK_M | BLOCK_N. Sized for H100/H200
# (228 KB of shared memory per SM); configs that do not fit are dropped by the autotuner. The first of each
# list is the one used without autotuning. All of them compile for sm_90 and fit; at d = 128 (bf16) ptxas
# reports register spills for every dK/dV config tried (150-900 bytes per thread; about 200 for the first)
# and none for the first fwd and dQ configs: the dK/dV kernel is where GPU tuning should start.
GPU_TILES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
            128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]},
    "dkdv": {64: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
             128: [(32, 64, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (16, 64, 4, 3)],
             256: [(16, 64, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2)]},
    "dq": {64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
           128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)],
           256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)]},
}
# float32 inputs: the operands take twice the shared memory, and the three-pass tf32 product (see
# `_dot_precision`) more registers: smaller tiles, fewer stages.
GPU_TILES_FLOAT32 = {
    "fwd": {64: [(64, 32, 4, 2), (64, 64, 4, 2)], 128: [(64, 32, 4, 2), (64, 64, 4, 2)],
            256: [(32, 16, 4, 1), (32, 32, 4, 1)]},
    "dkdv": {64: [(32, 64, 4, 2), (16, 32, 4, 2)], 128: [(32, 64, 4, 2), (16, 32, 4, 2)], 256: [(16, 32, 4, 1)]},
    "dq": {64: [(64, 32, 4, 2), (32, 32, 4, 2)], 128: [(64, 32, 4, 2), (32, 32, 4, 2)], 256: [(32, 16, 4, 1)]},
}
# Under the interpreter: one deterministic config; tiles unequal in the two directions, so that the small test
# shapes still cover several key tiles per query tile and the masked / unmasked split of the loops.
INTERPRETER_TILES = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
PREPROCESS_BLOCK_M = 64
AUTOTUNE_ENV = "FPA_TRITON_AUTOTUNE"  # "0": only the first config of each list (fast compiles, e.g. GPU tests)
TUNING_KEY = ["seq_len", "seq_len_k", "num_q_heads", "group", "HEAD_DIM", "CAUSAL", "PENALTY", "OFFSETS",
              "HAS_DOCS", "DOT_PRECISION"]


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernels module, imported on first use: whether it runs interpreted is fixed at that moment."""
    # imports triton (optional); whether it runs interpreted is fixed at that first import
    return importlib.import_module("fpa_megatron.attention.triton_kernels")


@functools.lru_cache(maxsize=None)
def _launcher(kind: str, head_dim: int, float32: bool = False):
    """The kernel of `kind` wrapped in triton.autotune over its tile configs for this head dim (and dtype)."""
    import triton

    kernels = _kernels()
    kernel = {"fwd": kernels.attn_fwd_kernel, "dkdv": kernels.attn_bwd_dkdv_kernel,
              "dq": kernels.attn_bwd_dq_kernel}[kind]
    if kernels.INTERPRETING:
        block_m, block_n = INTERPRETER_TILES[kind]
        configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n})]
    else:
        table = (GPU_TILES_FLOAT32 if float32 else GPU_TILES)[kind]
        tiles = table[min(k for k in table if k >= head_dim)]
        if os.environ.get(AUTOTUNE_ENV, "1") == "0":
            tiles = tiles[:1]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]
    key = TUNING_KEY + (["HAS_GRAD_PENALTY"] if kind != "fwd" else [])
    return triton.autotune(configs=configs, key=key)(kernel)


def chosen_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Per kernel, the tile config in use for this head dim (the autotuner's pick for the last shape it saw)."""
    float32 = dtype == torch.float32
    picked = {kind: getattr(_launcher(kind, head_dim, float32), "best_config", None)
              for kind in ("fwd", "dkdv", "dq")}
    return {kind: (f"BLOCK_M {c.kwargs['BLOCK_M']}, BLOCK_N {c.kwargs['BLOCK_N']}, warps {c.num_warps}, "
                   f"stages {c.num_stages}") for kind, c in picked.items() if c is not None}


def triton_attention_supported(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> tuple[bool, str]:
    """(True, "supported") if `triton_attention` can run on these inputs, else (False, the reason)."""
    if q.dim() != 4 or k.dim() != 4:
        return False, f"expected q [b, hq, s, d] and k [b, hkv, s, d], got {tuple(q.shape)}, {tuple(k.shape)}"
    if v is not None and v.shape != k.shape:
        return False, f"v {tuple(v.shape)} differs from k {tuple(k.shape)}"
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or k.shape[1] == 0 or hq % k.shape[1]:
        return False, f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same b, s, d and hq % hkv == 0"
    if s == 0 or b * hq == 0:
        return False, f"empty input q {tuple(q.shape)}"
    if b * hq > MAX_GRID_Y:
        return False, f"batch x query heads = {b * hq} > {MAX_GRID_Y} (the kernel grid's limit)"
    if d > MAX_HEAD_DIM or d & (d - 1):
        return False, f"head dim {d}: must be a power of two <= {MAX_HEAD_DIM}"
    dtypes = {t.dtype for t in (q, k, v) if t is not None}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(t).replace("torch.", "") for t in SUPPORTED_DTYPES)
        return False, f"dtype {sorted(map(str, dtypes))}: q, k, v must share one of {names}"
    devices = {t.device for t in (q, k, v) if t is not None}
    if len(devices) != 1:
        return False, f"q, k, v on different devices {sorted(map(str, devices))}"
    try:
        kernels = _kernels()
    except ImportError as e:
        return False, f"the Triton kernels cannot be imported ({e})"
    if kernels.INTERPRETING and q.device.type != "cpu":
        return False, f"device {q.device}: Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors only"
    if not kernels.INTERPRETING and q.device.type != "cuda":
        return False, (f"device {q.device}: the compiled kernels need CUDA tensors (or TRITON_INTERPRET=1, set "
                       "before triton is first imported, to interpret them on CPU)")
    return True, "supported"


def _last_dim_contiguous(t: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1 (any other layout of b, h, s is fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow torch's matmul precision: 'highest' (the default) gives "tf32x3" (three tf32
    tensor-core products per dot, about float32 accuracy; plain IEEE float32 dots spilled badly and took
    minutes to compile for sm_90), 'high' / 'medium' give tf32. Ignored for bf16 / fp16 operands."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _row_ranges(ranges: Optional[DocumentRanges], stand_in: Tensor) -> tuple[Tensor, Tensor]:
    """The forward's and dQ kernel's RowLo, RowHi arguments (without documents: an unread stand-in)."""
    return (stand_in, stand_in) if ranges is None else (ranges.row_lo, ranges.row_hi)


def _col_ranges(ranges: Optional[DocumentRanges], stand_in: Tensor) -> tuple[Tensor, Tensor]:
    """The dK/dV kernel's ColLo, ColHi arguments (without documents: an unread stand-in)."""
    return (stand_in, stand_in) if ranges is None else (ranges.col_lo, ranges.col_hi)


class DocumentRanges(NamedTuple):
    """What the kernels read of the document ids (HAS_DOCS), int32 [b, s]: per query row the keys [row_lo,
    row_hi) it sees, per key the query rows [col_lo, col_hi) that see it (documents.py: both contiguous)."""

    row_lo: Tensor
    row_hi: Tensor
    col_lo: Tensor
    col_hi: Tensor


def document_ranges(q_docs: Tensor, k_docs: Tensor, *, causal: bool, delta: int = 0) -> DocumentRanges:
    """The per-row and per-key ranges of query rows q_docs [b, sq] against keys k_docs [b, sk] (ids of the
    same documents; query row i sits `delta` positions after key i: causal, it sees keys j <= i + delta)."""
    q_docs, k_docs = q_docs.to(torch.int64), k_docs.to(torch.int64)
    row_lo, row_hi = key_ranges(q_docs, k_docs, 1, causal=causal, delta=delta)
    col_lo, col_hi = key_ranges(k_docs, q_docs, 1, causal=False)  # the rows of each key's document
    if causal:  # and of them the rows i >= j - delta
        first_row = torch.arange(k_docs.shape[-1], device=k_docs.device) - delta
        col_lo = torch.maximum(col_lo, first_row.clamp(0, q_docs.shape[-1]))
    return DocumentRanges(*(t.to(torch.int32).contiguous() for t in (row_lo, row_hi, col_lo, col_hi)))


class TritonAttention(torch.autograd.Function):
    """The fused forward and backward; see `triton_attention` for the arguments."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, target: str, compute_penalty: bool,
                causal: bool, ranges: Optional[DocumentRanges]):
        kernels = _kernels()
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        # [b, hq, s, d] laid out in memory as [s, b, hq, d]: Megatron's [s, b, hq * d] view of it is free
        out = torch.empty(s, b, hq, d, dtype=q.dtype, device=q.device).permute(1, 2, 0, 3)
        lse2 = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)  # base-2 log-sum-exp per row
        row_penalty = torch.empty(b, hq, s, dtype=torch.float32, device=q.device) if compute_penalty else None
        penalty_kind = (kernels.PENALTY_NONE if not compute_penalty else
                        kernels.PENALTY_PROBS if target == "probs" else kernels.PENALTY_LOGITS)
        flags = dict(HEAD_DIM=d, CAUSAL=causal, DOT_DTYPE=kernels.dot_dtype(q.dtype),
                     DOT_PRECISION=_dot_precision(q.dtype))
        grid = lambda meta: (_cdiv(s, meta["BLOCK_M"]), b * hq)  # noqa: E731
        _launcher("fwd", d, q.dtype == torch.float32)[grid](
            q, k, v, out, lse2, row_penalty if compute_penalty else lse2, *_row_ranges(ranges, lse2),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            hq, group, s, s, 0, softmax_scale, PENALTY=int(penalty_kind), OFFSETS=False, PARTIAL=False,
            HAS_DOCS=ranges is not None, **flags)

        # The collision term enters the backward (D_i += 2 g_i c_i); the logits penalty needs nothing saved.
        collision = row_penalty if compute_penalty and target == "probs" else None
        ctx.save_for_backward(q, k, v, out, lse2, collision)
        ctx.softmax_scale, ctx.target, ctx.compute_penalty, ctx.causal = softmax_scale, target, compute_penalty, causal
        ctx.penalty_kind, ctx.ranges = int(penalty_kind), ranges
        ctx.set_materialize_grads(False)
        return out, row_penalty

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_penalty: Optional[Tensor]):
        q, k, v, out, lse2, collision = ctx.saved_tensors
        has_grad_penalty = ctx.compute_penalty and grad_penalty is not None
        if grad_out is None and not has_grad_penalty:
            return (None,) * 8
        kernels = _kernels()
        b, hq, s, d = q.shape
        group = hq // k.shape[1]
        do = _last_dim_contiguous(grad_out) if grad_out is not None else torch.zeros_like(out)
        g = grad_penalty.to(torch.float32).contiguous() if has_grad_penalty else lse2  # lse2: an unread stand-in

        delta = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        add_collision = has_grad_penalty and ctx.target == "probs"
        kernels.attn_bwd_preprocess_kernel[(_cdiv(s, PREPROCESS_BLOCK_M), b * hq)](
            out, do, collision if add_collision else lse2, g, delta,
            out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
            hq, s, HEAD_DIM=d, BLOCK_M=PREPROCESS_BLOCK_M, ADD_COLLISION=add_collision)

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flags = dict(HEAD_DIM=d, CAUSAL=ctx.causal, PENALTY=ctx.penalty_kind, HAS_GRAD_PENALTY=has_grad_penalty,
                     OFFSETS=False, HAS_DOCS=ctx.ranges is not None, DOT_DTYPE=kernels.dot_dtype(q.dtype),
                     DOT_PRECISION=_dot_precision(q.dtype))
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        kv_grid = lambda meta: (_cdiv(s, meta["BLOCK_N"]), b * k.shape[1])  # noqa: E731
        _launcher("dkdv", d, q.dtype == torch.float32)[kv_grid](
            q, k, v, do, lse2, delta, g, dk, dv, *_col_ranges(ctx.ranges, lse2), *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            hq, group, s, s, 0, ctx.softmax_scale, **flags)
        q_grid = lambda meta: (_cdiv(s, meta["BLOCK_M"]), b * hq)  # noqa: E731
        _launcher("dq", d, q.dtype == torch.float32)[q_grid](
            q, k, v, do, lse2, delta, g, dq, *_row_ranges(ctx.ranges, lse2), *common,
            dq.stride(0), dq.stride(1), dq.stride(2), hq, group, s, s, 0, ctx.softmax_scale, **flags)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                     compute_penalty: bool = True, causal: bool = True,
                     document_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Attention and its per-row FPA penalty in fused Triton kernels (same contract as `blockwise_attention`).

    q: [b, hq, s, d]; k, v: [b, hkv, s, d] (hq % hkv == 0, GQA); float32, bfloat16 or float16, d a power of
    two <= 256; CUDA tensors (CPU tensors under TRITON_INTERPRET=1). Returns (out [b, hq, s, d] in q's dtype,
    row_penalty [b, hq, s] float32, or None when compute_penalty=False). row_penalty: probs: c_i =
    sum_j p_ij^2; logits: sum over visible j of s_ij^2, s_ij = scale * q_i . k_j. Differentiable in q, k, v
    and in row_penalty (any upstream gradient). document_ids [b, s] int (documents.py; None: one document):
    query i sees key j only within its document, and only the tiles that hold such pairs are visited. Raises
    ValueError when `triton_attention_supported` says no or the document ids are unusable.
    """
    require_one_of("target", target, FPA_TARGETS)
    ok, reason = triton_attention_supported(q, k, v)
    if not ok:
        raise ValueError(f"triton_attention: {reason}")
    ranges = None
    if document_ids is not None:
        check_document_ids(document_ids, q.shape[0], q.shape[2])
        docs = document_ids.to(q.device)
        ranges = document_ranges(docs, docs, causal=bool(causal))
    d = q.shape[-1]
    if d < MIN_DOT_DIM:  # zero columns change no score; the output's extra columns are sliced off
        pad = (0, MIN_DOT_DIM - d)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    out, row_penalty = TritonAttention.apply(q, k, v, float(softmax_scale), target, bool(compute_penalty),
                                             bool(causal), ranges)
    if d < MIN_DOT_DIM:
        out = out[..., :d]
    return out, row_penalty


# ----------------------------------------------------------------------------------------------------------
# one slice of the keys, for merging (context parallelism): the same kernels with query/key offsets


def _check_partial(q: Tensor, k: Tensor, v: Tensor) -> None:
    """`triton_attention_supported` for a key slice whose length may differ from the queries' (it is given
    free views of k, v stretched to the query length)."""
    if k.dim() != 4 or k.shape != v.shape or k.shape[2] == 0 or q.dim() != 4:
        raise ValueError(f"triton_attention_partial: expected q [b, hq, sq, d] and k, v [b, hkv, sk, d] (sk > 0), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    stretched = [t[:, :, :1].expand(-1, -1, q.shape[2], -1) for t in (k, v)]
    ok, reason = triton_attention_supported(q, *stretched)
    if not ok:
        raise ValueError(f"triton_attention_partial: {reason}")


def _needs_offsets(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int) -> bool:
    """Whether a partial call needs the kernels' OFFSETS variant: a causal chunk against itself (the diagonal)
    is plain self-attention, which compiles to fewer registers (benchmarks/triton_compile_check.py)."""
    return sq != sk or (causal and q_offset != k_offset)


def _penalty_kind(target: Optional[str]):
    """The kernels' PENALTY constexpr for a partial call's target (None: no penalty)."""
    kernels = _kernels()
    return {None: kernels.PENALTY_NONE, "probs": kernels.PENALTY_PROBS, "logits": kernels.PENALTY_LOGITS}[target]


def _partial_ranges(q: Tensor, k: Tensor, q_documents: Optional[Tensor], k_documents: Optional[Tensor],
                    causal: bool, delta: int) -> Optional[DocumentRanges]:
    """The document ranges of a partial call (None without documents); both sides' ids or neither."""
    if (q_documents is None) != (k_documents is None):
        raise ValueError("triton_attention_partial: give q_documents and k_documents together, or neither")
    if q_documents is None:
        return None
    check_document_ids(q_documents, q.shape[0], q.shape[2])
    check_document_ids(k_documents, k.shape[0], k.shape[2])
    return document_ranges(q_documents.to(q.device), k_documents.to(q.device), causal=causal, delta=delta)


def _pad_head_dim(*tensors: Tensor) -> list[Tensor]:
    """Zero columns up to MIN_DOT_DIM (they change no score; sliced off the results)."""
    d = tensors[0].shape[-1]
    if d >= MIN_DOT_DIM:
        return list(tensors)
    return [torch.nn.functional.pad(t, (0, MIN_DOT_DIM - d)) for t in tensors]


def triton_attention_partial(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *,
                             target: Optional[str] = None, causal: bool = True, q_offset: int = 0,
                             k_offset: int = 0, q_documents: Optional[Tensor] = None,
                             k_documents: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`blockwise_attention_partial` in the fused forward kernel: q [b, hq, sq, d] against one key slice
    k, v [b, hkv, sk, d] (causal: query i sees key j iff k_offset + j <= q_offset + i; tiles that see nothing
    are skipped). q_documents [b, sq], k_documents [b, sk]: the document ids of these queries and keys (then
    also only keys of the query's document). Returns (out [b, hq, sq, d] float32, lse2 [b, hq, sq] float64
    (base 2, -inf for a row that sees no key), stat float64 (probs: base-2 LSE of 2 t, -inf for a row that sees
    no key; logits: sum of squared visible scores, 0) or None); a row that sees no key has out 0."""
    _check_partial(q, k, v)
    ranges = _partial_ranges(q, k, q_documents, k_documents, causal, q_offset - k_offset)
    kernels = _kernels()
    b, hq, sq, d = q.shape
    sk, group = k.shape[2], hq // k.shape[1]
    q, k, v = (_last_dim_contiguous(t) for t in _pad_head_dim(q, k, v))
    dp = q.shape[-1]
    out = torch.empty(b, hq, sq, dp, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    stat = torch.empty_like(lse2) if target is not None else None
    penalty_kind = _penalty_kind(target)
    grid = lambda meta: (_cdiv(sq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _launcher("fwd", dp, q.dtype == torch.float32)[grid](
        q, k, v, out, lse2, lse2 if stat is None else stat, *_row_ranges(ranges, lse2),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, group, sq, sk, q_offset - k_offset, softmax_scale, HEAD_DIM=dp, CAUSAL=causal,
        PENALTY=int(penalty_kind), OFFSETS=_needs_offsets(sq, sk, causal, q_offset, k_offset), PARTIAL=True,
        HAS_DOCS=ranges is not None, DOT_DTYPE=kernels.dot_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype))
    return out[..., :d], lse2.double(), None if stat is None else stat.double()


def triton_attention_partial_backward(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, lse2: Tensor,
                                      delta: Tensor, grad_penalty: Optional[Tensor], softmax_scale: float, *,
                                      target: Optional[str] = None, causal: bool = True, q_offset: int = 0,
                                      k_offset: int = 0, q_documents: Optional[Tensor] = None,
                                      k_documents: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """`blockwise_attention_partial_backward` in the fused dK/dV and dQ kernels: (dq, dk, dv) float32 of one
    key slice given the merged base-2 LSE, D' = rowsum(dO * O) (+ 2 g c) and the penalty's gradient g (None:
    no penalty term), all [b, hq, sq]; documents as in `triton_attention_partial`."""
    _check_partial(q, k, v)
    ranges = _partial_ranges(q, k, q_documents, k_documents, causal, q_offset - k_offset)
    kernels = _kernels()
    b, hq, sq, d = q.shape
    sk, group = k.shape[2], hq // k.shape[1]
    q, k, v, do = (_last_dim_contiguous(t) for t in _pad_head_dim(q, k, v, grad_out.to(q.dtype)))
    dp = q.shape[-1]
    lse2, delta = (t.to(torch.float32).contiguous() for t in (lse2, delta))
    has_grad_penalty = target is not None and grad_penalty is not None
    g = grad_penalty.to(torch.float32).contiguous() if has_grad_penalty else lse2  # lse2: an unread stand-in
    penalty_kind = _penalty_kind(target)
    dq = torch.empty(b, hq, sq, dp, dtype=torch.float32, device=q.device)
    dk = torch.empty(b, k.shape[1], sk, dp, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    flags = dict(HEAD_DIM=dp, CAUSAL=causal, PENALTY=int(penalty_kind), HAS_GRAD_PENALTY=has_grad_penalty,
                 OFFSETS=_needs_offsets(sq, sk, causal, q_offset, k_offset), HAS_DOCS=ranges is not None,
                 DOT_DTYPE=kernels.dot_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype))
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    kv_grid = lambda meta: (_cdiv(sk, meta["BLOCK_N"]), b * k.shape[1])  # noqa: E731
    _launcher("dkdv", dp, q.dtype == torch.float32)[kv_grid](
        q, k, v, do, lse2, delta, g, dk, dv, *_col_ranges(ranges, lse2), *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        hq, group, sq, sk, q_offset - k_offset, softmax_scale, **flags)
    q_grid = lambda meta: (_cdiv(sq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _launcher("dq", dp, q.dtype == torch.float32)[q_grid](
        q, k, v, do, lse2, delta, g, dq, *_row_ranges(ranges, lse2), *common,
        dq.stride(0), dq.stride(1), dq.stride(2), hq, group, sq, sk, q_offset - k_offset, softmax_scale, **flags)
    return dq[..., :d], dk[..., :d], dv[..., :d]
