"""Causal attention across context-parallel (CP) ranks, with the exact FPA penalty of every row.

Layout (Megatron's load-balanced causal split): the sequence of length S = C * s_local is cut into 2C chunks
of c = s_local / 2 tokens; CP rank r holds chunks r and 2C-1-r, in that order. Every rank then has the same
causal work: chunk r sees r + 1 chunks of keys, chunk 2C-1-r sees 2C - r.

Exchange: K/V gathered once per layer (all-gather, as Llama 3 did), not a ring. Each rank's K/V for all
hkv heads (GQA heads are never repeated) goes out in one asynchronous `all_gather_single`; while it is in
flight the rank computes both of its query chunks against their own (diagonal) chunk, then, with the whole
sequence's K/V, each chunk against the fully visible chunks before it (one partial per owner rank, read as
a view of the receive buffer: fully visible keys may come in any order, so the gathered K/V is never copied
into sequence order), and merges the partial results through their log-sum-exp (`merge_partials`). The backward gathers K/V again (saving it would hold S tokens
of K/V per layer), overlapped with the first chunk's diagonal, and sends dK/dV back to their owners in one
asynchronous `reduce_scatter_single` (accumulated in the receive buffer's rank order, so nothing is reordered),
overlapped with the second chunk's diagonal. Why not a ring: with the
load-balanced layout a ring needs C - 1 rounds of sends, each one as large as the all-gathered buffer's share,
and on gloo each round is a synchronization of two processes; the two collectives move the same bytes in
one call each and overlap as well. K/V are small next to the attention itself (2 * hkv * d values per
token), so holding the gathered S tokens of K/V for the duration of one layer's attention is cheap up to
large C. benchmarks/context_attention.py measures the exchange's share of the CP2 attention step.

Merging (partial.py, docs/fpa_math.md section 6): a partial over a key set K holds, per query row, the output normalized
over K, lse2 = log2 sum_{j in K} 2^(t_ij) (t = s * log2 e: the kernels work in base 2) and the penalty's
statistic: probs: log2 sum_{j in K} 2^(2 t_ij) (then c = 2^(stat - 2 lse2)); logits: sum_{j in K} s_ij^2.
LSEs merge by logaddexp2, sums add. The backward of every partial, given the merged LSE and
D'_i = rowsum(dO_i * O_i) + 2 g_i c_i, is exact: dS = p (dP + 2 g p - D'), the p normalized over all keys.

Kernels: 'blockwise' (plain torch, any device), 'triton' (CUDA, or CPU under TRITON_INTERPRET=1), 'sdpa'
(penalty-free: torch's CPU flash-attention op, which returns the LSE and has a backward that takes the merged
output and LSE; on CUDA the Triton kernel without the penalty), 'eager' (the reference: gathered K/V through
a differentiable all-gather, then explicit [s_local / 2, keys] scores per chunk, autograd for the backward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fpa_megatron.attention.blockwise import blockwise_attention_partial, blockwise_attention_partial_backward
from fpa_megatron.attention.documents import check_document_ids, document_mask
from fpa_megatron.attention.kernels import run_kernel
from fpa_megatron.attention.partial import LOG2E, Partial, merge_partials, row_penalty, score_grad_shift
from fpa_megatron.attention.reference import eager_attention
from fpa_megatron.attention.triton_attention import triton_attention_partial, triton_attention_partial_backward
from fpa_megatron.options import FPA_TARGETS, KERNELS, require_one_of

# ----------------------------------------------------------------------------------------------------------
# the kernels, behind one interface: forward(q, k, v, causal) -> Partial, backward(...) -> (dq, dk, dv)
# causal=True: q and k are the same chunk (square causal mask); False: every key is visible.


class _BlockwiseKernel:
    def __init__(self, softmax_scale: float, target: Optional[str], block_size: int):
        self.scale, self.target, self.block_size = softmax_scale, target, block_size

    def forward(self, q, k, v, causal: bool, docs=(None, None)) -> Partial:
        return Partial(*blockwise_attention_partial(q, k, v, self.scale, target=self.target, causal=causal,
                                                    block_size=self.block_size, q_documents=docs[0],
                                                    k_documents=docs[1]))

    def backward(self, q, k, v, grad_out, out, lse2, delta, grad_penalty, causal: bool, docs=(None, None)):
        return blockwise_attention_partial_backward(q, k, v, grad_out, lse2, delta, grad_penalty, self.scale,
                                                    target=self.target, causal=causal, block_size=self.block_size,
                                                    q_documents=docs[0], k_documents=docs[1])


class _TritonKernel:
    def __init__(self, softmax_scale: float, target: Optional[str]):
        self.scale, self.target = softmax_scale, target

    def forward(self, q, k, v, causal: bool, docs=(None, None)) -> Partial:
        return Partial(*triton_attention_partial(q, k, v, self.scale, target=self.target, causal=causal,
                                                 q_documents=docs[0], k_documents=docs[1]))

    def backward(self, q, k, v, grad_out, out, lse2, delta, grad_penalty, causal: bool, docs=(None, None)):
        return triton_attention_partial_backward(q, k, v, grad_out, lse2, delta, grad_penalty, self.scale,
                                                 target=self.target, causal=causal, q_documents=docs[0],
                                                 k_documents=docs[1])


class _SdpaCpuKernel:
    """torch's CPU flash-attention op: it returns the (natural) LSE, and its backward takes the output and LSE
    it should use for D and P, so the merged ones make each partial's gradient exact. No penalty."""

    def __init__(self, softmax_scale: float):
        self.scale, self.target = softmax_scale, None

    def forward(self, q, k, v, causal: bool, docs=(None, None)) -> Partial:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                             scale=self.scale)
        return Partial(out.to(torch.float64 if q.dtype == torch.float64 else torch.float32), lse.double() * LOG2E,
                       None)

    def backward(self, q, k, v, grad_out, out, lse2, delta, grad_penalty, causal: bool, docs=(None, None)):
        lse = (lse2.double() / LOG2E).float()
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(q.dtype).contiguous(), q, k, v, out.contiguous(), lse, 0.0, causal, scale=self.scale)


# ----------------------------------------------------------------------------------------------------------
# the exchange


def _sequence_order(gathered: Tensor, cp_size: int) -> Tensor:
    """[C, ..., s_local, d] as gathered (rank r: chunks r, 2C-1-r) -> [..., S, d] in sequence order (a copy:
    only the eager reference path uses it)."""
    first, second = gathered.unflatten(-2, (2, gathered.shape[-2] // 2)).unbind(-3)  # [C, ..., c, d] each
    chunks = torch.cat([first, second.flip(0)])  # [2C, ..., c, d]: chunk i at index i
    return chunks.movedim(0, -3).flatten(-3, -2)


def _rank_order(x: Tensor, cp_size: int) -> Tensor:
    """Inverse of `_sequence_order`: [..., S, d] -> [C, ..., s_local, d], contiguous (for reduce-scatter)."""
    chunks = x.unflatten(-2, (2 * cp_size, x.shape[-2] // (2 * cp_size))).movedim(-3, 0)  # [2C, ..., c, d]
    per_rank = torch.stack([chunks[:cp_size], chunks[cp_size:].flip(0)], dim=-3)  # [C, ..., 2, c, d]
    return per_rank.flatten(-3, -2).contiguous()


def visible_key_blocks(chunk: int, cp_size: int) -> list[tuple[int, int]]:
    """The keys a query chunk sees fully (every chunk before it), as (owner CP rank j, local chunks of j): 2 when
    both of j's chunks come before `chunk` (its local K/V whole), 1 when only its first (chunk j) does. Keys
    fully visible may be attended in any order, so each block is a view of the gathered buffer, never a copy."""
    blocks = []
    for j in range(cp_size):
        if 2 * cp_size - 1 - j < chunk:
            blocks.append((j, 2))
        elif j < chunk:
            blocks.append((j, 1))
    return blocks


class _KVGather:
    """One asynchronous all-gather of this rank's K and V; `wait()` returns both as [C, b, hkv, s_local, d] in
    rank order (views of the one receive buffer: rank j's K/V at index j, its chunks j and 2C-1-j in order)."""

    def __init__(self, k: Tensor, v: Tensor, group):
        self.cp_size = dist.get_world_size(group)
        local = torch.stack([k, v])  # [2, b, hkv, s_local, d]
        self.gathered = local.new_empty((self.cp_size,) + local.shape)
        with torch.profiler.record_function("fpa/cp_kv_exchange"):
            self.work = dist.all_gather_single(self.gathered.flatten(0, 1), local, group=group, async_op=True)

    def wait(self) -> tuple[Tensor, Tensor]:
        with torch.profiler.record_function("fpa/cp_kv_exchange"):
            self.work.wait()
        return self.gathered[:, 0], self.gathered[:, 1]


class _GradScatter:
    """One asynchronous reduce-scatter of dK/dV, given in rank order as one [C, 2, b, hkv, s_local, d] buffer;
    `wait()` returns this rank's summed share (dk, dv)."""

    def __init__(self, grads: Tensor, group):
        self.local = grads.new_empty(grads.shape[1:])
        with torch.profiler.record_function("fpa/cp_grad_scatter"):
            self.work = dist.reduce_scatter_single(self.local, grads.flatten(0, 1), group=group, async_op=True)

    def wait(self) -> tuple[Tensor, Tensor]:
        with torch.profiler.record_function("fpa/cp_grad_scatter"):
            self.work.wait()
        return self.local[0], self.local[1]


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    c = t.shape[2] // 2
    return t[:, :, :c], t[:, :, c:]


class _ChunkDocuments:
    """The document ids [b, S] of the whole sequence cut as the kernels need them: `queries(chunk)` the ids of a
    global chunk's c positions, `keys(j, n)` those of CP rank j's first n local chunks (chunks j, 2C-1-j), each a
    (q_docs, k_docs) pair for a kernel call. Without documents every pair is (None, None)."""

    def __init__(self, docs: Optional[Tensor], c: int, cp_size: int):
        self.docs, self.c, self.cp_size = docs, c, cp_size

    def _chunk(self, i: int) -> Optional[Tensor]:
        return None if self.docs is None else self.docs[:, i * self.c:(i + 1) * self.c]

    def diagonal(self, chunk: int) -> tuple:
        return self._chunk(chunk), self._chunk(chunk)

    def block(self, chunk: int, j: int, n: int) -> tuple:
        if self.docs is None:
            return None, None
        keys = torch.cat([self._chunk(j), self._chunk(2 * self.cp_size - 1 - j)], dim=1)[:, :n * self.c]
        return self._chunk(chunk), keys


class ContextParallelAttention(torch.autograd.Function):
    """Forward and backward of `context_parallel_attention` for the merging kernels (blockwise, triton, sdpa).

    Memory: besides this rank's own tensors, only two buffers of the whole sequence's K/V size exist, and not
    at once beyond one layer: the gathered K/V (forward, then again in backward) and the dK/dV receive-order
    buffer that is reduce-scattered; the kernels read views of them, one owner rank's block at a time."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kernel, group, docs: Optional[Tensor]):
        cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
        c = q.shape[2] // 2
        chunks = (rank, 2 * cp_size - 1 - rank)  # the global chunk index of each local half
        documents = _ChunkDocuments(docs, c, cp_size)
        pending = _KVGather(k, v, group)
        # each half against its own chunk, while the other ranks' K/V arrive
        parts = [[kernel.forward(qh, kh, vh, causal=True, docs=documents.diagonal(chunk))]
                 for qh, kh, vh, chunk in zip(_halves(q), _halves(k), _halves(v), chunks)]
        k_ranks, v_ranks = pending.wait()
        for half, chunk, qh in zip(parts, chunks, _halves(q)):
            for j, n in visible_key_blocks(chunk, cp_size):  # the chunks before it, every key visible
                half.append(kernel.forward(qh, k_ranks[j, :, :, :n * c], v_ranks[j, :, :, :n * c], causal=False,
                                           docs=documents.block(chunk, j, n)))
        del k_ranks, v_ranks, pending  # the whole sequence's K/V is not kept: backward gathers it again
        merged = [merge_partials(half, kernel.target) for half in parts]
        out = torch.cat([m.out for m in merged], dim=2).to(q.dtype)
        lse2 = torch.cat([m.lse2 for m in merged], dim=2)
        penalty = None
        if kernel.target is not None:
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            penalty = torch.cat([row_penalty(m, kernel.target) for m in merged], dim=2).to(acc)
        ctx.save_for_backward(q, k, v, out, lse2, penalty if kernel.target == "probs" else None, docs)
        ctx.kernel, ctx.group, ctx.chunks = kernel, group, chunks
        ctx.set_materialize_grads(False)
        return out, penalty

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_penalty: Optional[Tensor]):
        q, k, v, out, lse2, collision, docs = ctx.saved_tensors
        kernel, group = ctx.kernel, ctx.group
        g = grad_penalty if kernel.target is not None else None
        if grad_out is None and g is None:
            return (None,) * 6
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        cp_size = dist.get_world_size(group)
        c = q.shape[2] // 2
        documents = _ChunkDocuments(docs, c, cp_size)
        delta = score_grad_shift(out, grad_out, collision, g)  # [b, hq, s_local]
        rows = [tuple(_halves(t)) if t is not None else (None, None) for t in (q, grad_out, out, lse2, delta, g)]
        rows = list(zip(*rows))  # per half: (q, dO, O, lse2, D', g)

        pending = _KVGather(k, v, group)
        (k0, k1), (v0, v1) = _halves(k), _halves(v)
        first = kernel.backward(rows[0][0], k0, v0, *rows[0][1:], causal=True,  # while K/V arrive
                                docs=documents.diagonal(ctx.chunks[0]))
        k_ranks, v_ranks = pending.wait()
        grads = torch.zeros((cp_size, 2) + tuple(k.shape), dtype=first[1].dtype, device=k.device)  # rank order
        dq = [first[0], None]
        for i, chunk in enumerate(ctx.chunks):
            for j, n in visible_key_blocks(chunk, cp_size):
                keys = slice(0, n * c)
                dq_p, dk_p, dv_p = kernel.backward(rows[i][0], k_ranks[j, :, :, keys], v_ranks[j, :, :, keys],
                                                   *rows[i][1:], causal=False, docs=documents.block(chunk, j, n))
                dq[i] = dq_p if dq[i] is None else dq[i] + dq_p
                grads[j, 0, :, :, keys] += dk_p
                grads[j, 1, :, :, keys] += dv_p
        del k_ranks, v_ranks, pending
        scatter = _GradScatter(grads, group)
        second = kernel.backward(rows[1][0], k1, v1, *rows[1][1:], causal=True,  # while dK/dV travel
                                 docs=documents.diagonal(ctx.chunks[1]))
        dq[1] = second[0] if dq[1] is None else dq[1] + second[0]
        dk_local, dv_local = scatter.wait()
        del scatter, grads
        dk = dk_local + torch.cat([first[1], second[1]], dim=2)
        dv = dv_local + torch.cat([first[2], second[2]], dim=2)
        return torch.cat(dq, dim=2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _GatherSequence(torch.autograd.Function):
    """Differentiable all-gather of K and V in sequence order (the eager path); backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, group):
        ctx.group = group
        cp_size = dist.get_world_size(group)
        return tuple(_sequence_order(t, cp_size) for t in _KVGather(k, v, group).wait())

    @staticmethod
    def backward(ctx, dk_all: Tensor, dv_all: Tensor):
        grads = _rank_order(torch.stack([dk_all, dv_all]), dist.get_world_size(ctx.group))  # [C, 2, ...]
        dk, dv = _GradScatter(grads, ctx.group).wait()
        return dk, dv, None


def _eager_context_attention(q, k, v, softmax_scale, group, target, compute_penalty, attention_mask=None):
    """The reference: explicit scores of each local half against every key up to its end (eager_attention's
    causal mask is aligned to the last key, which is what a chunk against the keys [0, its end) needs); an
    explicit mask [.., .., s_local, S] adds the half's rows of it, keys [0, end)."""
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    c = q.shape[2] // 2
    k_all, v_all = _GatherSequence.apply(k, v, group)
    outs, penalties = [], []
    for half, (qh, chunk) in enumerate(zip(_halves(q), (rank, 2 * cp_size - 1 - rank))):
        end = (chunk + 1) * c
        mask = None if attention_mask is None else attention_mask[:, :, half * c:(half + 1) * c, :end]
        out, penalty = eager_attention(qh, k_all[:, :, :end], v_all[:, :, :end], softmax_scale, target=target,
                                       compute_penalty=compute_penalty, attention_mask=mask)
        outs.append(out)
        penalties.append(penalty)
    return torch.cat(outs, dim=2), torch.cat(penalties, dim=2) if compute_penalty else None


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, cp_group,
                               target: str = "probs", compute_penalty: bool = True, kernel: str = "blockwise",
                               block_size: int = 64, attention_mask: Optional[Tensor] = None,
                               document_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """q [b, hq, s_local, d], k/v [b, hkv, s_local, d]: this CP rank's tokens in Megatron's load-balanced
    causal layout (the sequence of length S = s_local * C cut into 2C chunks, CP rank r holds chunks r and
    2C-1-r, in that order; C = cp_group size, r = rank in cp_group). Returns (out [b, hq, s_local, d],
    row_penalty [b, hq, s_local] float32 or None): exact causal attention of these queries against every key
    of the whole sequence, and each row's exact penalty (probs: sum_j p_ij^2; logits: sum over visible j of s_ij^2).
    kernel: 'blockwise' | 'triton' | 'eager' | 'sdpa' (sdpa only with compute_penalty=False). Differentiable:
    dq, dk, dv exact, dk/dv returned to the ranks that own those keys. cp_group None (or of size 1): the
    whole sequence is local, the single-process kernels run. attention_mask (kernel 'eager' only): bool, True =
    masked, [b or 1, 1 or hq, s_local, S], this rank's query rows (its two chunks in order) against every key in
    sequence order, on top of the causal mask (what `split_batch_for_context_parallel` makes of [b, 1, S, S]).
    document_ids [b, S] (documents.py): document masking; the ids of the whole sequence in sequence order (every
    rank holds them: no exchange), each query sees only its own document's keys, on any rank."""
    require_one_of("target", target, FPA_TARGETS)
    require_one_of("kernel", kernel, KERNELS)
    if kernel == "sdpa" and compute_penalty:
        raise ValueError("kernel='sdpa' computes no penalty: pass compute_penalty=False or another kernel")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, hq, s, d] and k, v [b, hkv, s, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same b, s, d and hq % hkv == 0")
    if q.shape[2] % 2:
        raise ValueError(f"s_local={q.shape[2]}: a CP rank holds two equal chunks, s_local must be even")
    # None means no context parallelism (not the default group: a non-CP multi-rank run must not split)
    cp_size = dist.get_world_size(cp_group) if cp_group is not None and dist.is_initialized() else 1
    if attention_mask is not None:
        if kernel != "eager":
            raise ValueError(f"kernel={kernel!r} is causal only: an explicit attention_mask needs kernel='eager'")
        if attention_mask.dim() != 4 or tuple(attention_mask.shape[2:]) != (q.shape[2], q.shape[2] * cp_size):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: expected [b, h, s_local, S] "
                             f"= [.., .., {q.shape[2]}, {q.shape[2] * cp_size}]")
    check_document_ids(document_ids, q.shape[0], q.shape[2] * cp_size)
    if cp_size == 1:
        return run_kernel(kernel, q, k, v, softmax_scale, target=target, compute_penalty=compute_penalty,
                          block_size=block_size, attention_mask=attention_mask, document_ids=document_ids)
    if document_ids is not None:
        if kernel == "sdpa":
            raise ValueError("kernel 'sdpa' takes no document ids")
        if kernel == "eager":  # this rank's rows (its two chunks, in order) against every key
            c = q.shape[2] // 2
            rank = dist.get_rank(cp_group)
            local = torch.cat([document_ids[:, i * c:(i + 1) * c] for i in (rank, 2 * cp_size - 1 - rank)], dim=1)
            attention_mask = document_mask(local, document_ids)
    if kernel == "eager":
        return _eager_context_attention(q, k, v, softmax_scale, cp_group, target, compute_penalty, attention_mask)
    penalty_target = target if compute_penalty else None
    if kernel == "blockwise":
        impl = _BlockwiseKernel(float(softmax_scale), penalty_target, int(block_size))
    elif kernel == "triton" or q.device.type != "cpu":  # sdpa on CUDA: the Triton kernel without the penalty
        impl = _TritonKernel(float(softmax_scale), penalty_target)
    else:
        impl = _SdpaCpuKernel(float(softmax_scale))
    return ContextParallelAttention.apply(q, k, v, impl, cp_group, document_ids)
