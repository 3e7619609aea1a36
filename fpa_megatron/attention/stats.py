"""Attention diagnostics: per layer and head, how peaked the attention rows are, in every run.

Three statistics of the attention probabilities p_ij = softmax_j(s_ij), s_ij = scale * q_i . k_j:
- collision probability c_i = sum_j p_ij^2 (what the FPA penalty pushes down; 1/(i+1) <= c_i <= 1),
- Shannon entropy H_i = -sum_j p_ij log p_ij in nats (0 for a one-hot row, log(i+1) for a uniform one),
- the largest attention logit max_j s_ij (the scaled score; its growth precedes attention-entropy collapse).
Per head, c and H are averaged over the rows (all sequences and positions of the micro-batch) and the logit is
maxed.

They are measured from q and k at the top of the core attention's forward, whatever path computes its output
(eager, blockwise, a fused kernel), so FPA on and FPA off are measured the same way:
- `eager_attention_stats`: explicit [b, h, s, s] softmax (what the eager attention materializes anyway);
- `online_attention_stats`: O(s) memory, one key tile at a time with a running max m, l = sum exp(s - m),
  q2 = sum exp(2 (s - m)) and w = sum exp(s - m) (s - m); then c = q2 / l^2 and
  H = log l - w / l (from H = LSE - sum_j p_j s_j with LSE = m + log l). w is kept relative to the running max
  rather than as sum exp(s - m) s: the same quantity without the cancellation of m + log l - (...) when the
  logits are large.

The math, and why w is kept relative to the running max: docs/fpa_math.md, section 4.
`AttentionStats` is the per-replica record the layers fill while `measuring` is set; `reduce()` gives the
[L, H] matrices complete on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state
from torch import Tensor

from fpa_megatron.parallel.context import context_parallel_rank, context_parallel_size, cp_chunk_bounds, gather_sequence
from fpa_megatron.parallel.state import compute_device

DEFAULT_STATS_BLOCK = 128  # key tile of the online statistics


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """q [b, hq, s, d], k [b, hkv, s, d] -> q [b, hkv, group, s, d], k [b, hkv, 1, s, d] (GQA without copies)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same b and d and hq % hkv == 0")
    return q.reshape(b, hkv, hq // hkv, s, d), k.unsqueeze(2)


def _mask_tile(sq: int, sk: int, j0: int, j1: int, causal: bool, attention_mask: Optional[Tensor],
               device, documents: Optional[tuple[Tensor, Tensor]] = None) -> Optional[Tensor]:
    """Bool mask (True = masked) of key columns [j0, j1) for all sq rows, broadcastable to [b, hkv, g, sq, cols].

    attention_mask is already in the grouped layout of `_expand_mask`; documents (q_docs [b, sq], k_docs [b, sk])
    masks the keys of other documents, one tile at a time.
    """
    mask = None
    if causal:  # key j is in the future of query i (the last query sees every key when sk > sq)
        rows = torch.arange(sq, device=device).unsqueeze(-1)
        cols = torch.arange(j0, j1, device=device).unsqueeze(0)
        mask = cols > rows + (sk - sq)
    if attention_mask is not None:
        tile = attention_mask[..., j0:j1].to(torch.bool)
        mask = tile if mask is None else (mask | tile)
    if documents is not None:
        q_docs, k_docs = documents
        tile = (q_docs[:, :, None] != k_docs[:, None, j0:j1])[:, None, None]  # [b, 1, 1, sq, cols]
        mask = tile if mask is None else (mask | tile)
    return mask


def _expand_mask(attention_mask: Optional[Tensor], hq: int, hkv: int) -> Optional[Tensor]:
    """A [b|1, hq|1, s, s] mask as [b|1, hkv|1, group|1, s, s] to match `_grouped`."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be [b, h, s, s] (or broadcastable), got {tuple(attention_mask.shape)}")
    b, h, sq, sk = attention_mask.shape
    if h == 1:
        return attention_mask.unsqueeze(2)
    return attention_mask.reshape(b, hkv, hq // hkv, sq, sk)


def eager_attention_stats(q: Tensor, k: Tensor, softmax_scale: float, *, causal: bool = True,
                          attention_mask: Optional[Tensor] = None,
                          documents: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (collision, entropy, max logit), each [b, hq, s], from the explicit softmax of all scores.

    q: [b, hq, s, d]; k: [b, hkv, s, d] (GQA: hq % hkv == 0). attention_mask: optional bool (True = masked),
    broadcastable to [b, hq, s, s], combined with the causal mask. float32 math (float64 for float64 inputs).
    """
    b, hq, s, _ = q.shape
    acc = _acc_dtype(q.dtype)
    qg, kg = _grouped(q.to(acc), k.to(acc))
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * softmax_scale  # [b, hkv, g, s, s]
    mask = _mask_tile(s, k.shape[2], 0, k.shape[2], causal, _expand_mask(attention_mask, hq, k.shape[1]), q.device,
                      documents)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    collision = probs.square().sum(-1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    max_logit = scores.amax(-1)
    return tuple(x.reshape(b, hq, s) for x in (collision, entropy, max_logit))  # type: ignore[return-value]


def online_attention_stats(q: Tensor, k: Tensor, softmax_scale: float, *, causal: bool = True,
                           attention_mask: Optional[Tensor] = None,
                           block_size: int = DEFAULT_STATS_BLOCK,
                           documents: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same as `eager_attention_stats`, one key tile of `block_size` columns at a time (O(s) memory per row).

    Key tiles that the causal mask hides from every row of the tile's rows are still visited (the rows are
    all queries). A row may see none of a tile's keys (its max stays -inf, its sums 0 until a tile it sees).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    b, hq, s, _ = q.shape
    sk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    qg, kg = _grouped(q.to(acc) * softmax_scale, k.to(acc))
    mask_full = _expand_mask(attention_mask, hq, k.shape[1])
    m = l = q2 = w = None
    for j0 in range(0, sk, block_size):
        j1 = min(j0 + block_size, sk)
        st = torch.matmul(qg, kg[..., j0:j1, :].transpose(-1, -2))  # [b, hkv, g, s, cols]
        mask = _mask_tile(s, sk, j0, j1, causal, mask_full, q.device, documents)
        if mask is not None:
            st = st.masked_fill(mask, float("-inf"))
        m_tile = st.amax(-1)
        m_new = m_tile if m is None else torch.maximum(m, m_tile)
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # rows masked so far: 0
        z = st - shift.unsqueeze(-1)  # s - m, -inf where masked
        e = torch.exp(z)
        ez = torch.where(e > 0, e * z, torch.zeros_like(e))  # exp(z) z, 0 (not nan) where masked
        if m is None:
            l, q2, w = e.sum(-1), e.square().sum(-1), ez.sum(-1)
        else:
            seen = torch.isfinite(m)  # rows with a visible key before this tile (else l = q2 = w = 0)
            delta = torch.where(seen, m - shift, torch.zeros_like(m))  # old max - new max, <= 0
            alpha = torch.where(seen, torch.exp(delta), torch.zeros_like(m))  # rescales the old sums
            w = alpha * (w + l * delta) + ez.sum(-1)
            l = alpha * l + e.sum(-1)
            q2 = alpha.square() * q2 + e.square().sum(-1)
        m = m_new
    collision = q2 / l.square()
    entropy = torch.log(l) - w / l
    return tuple(x.reshape(b, hq, s) for x in (collision, entropy, m))  # type: ignore[return-value]


class AttentionStats:
    """The [L, H] attention statistics of one model replica, filled by the layers while `measuring` is set.

    Each layer writes its local heads at global indices (layer, tp_rank * H/TP + h): per head the mean
    collision and entropy over the micro-batch's rows and the max logit. `method`: "eager" (explicit softmax)
    or "online" (key tiles, O(s) memory).
    """

    def __init__(self, num_layers: int, num_heads: int, method: str = "online",
                 block_size: int = DEFAULT_STATS_BLOCK):
        if method not in ("eager", "online"):
            raise ValueError(f"AttentionStats method={method!r}: expected 'eager' or 'online'")
        self.num_layers, self.num_heads, self.method, self.block_size = num_layers, num_heads, method, block_size
        self.measuring = False
        self.reset()

    def reset(self) -> None:
        self.collision = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.entropy = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.max_logit = torch.full((self.num_layers, self.num_heads), -math.inf, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, layer_index: int, head_offset: int, q: Tensor, k: Tensor, softmax_scale: float,
                attention_mask: Optional[Tensor] = None, document_ids: Optional[Tensor] = None) -> None:
        """Record one layer's local heads; q [b, hq_local, s, d], k [b, hkv_local, s, d] (causal).

        Under context parallelism q and k are this rank's two chunks: the keys of the whole sequence are
        gathered, and each query chunk sees the keys up to its own end (the causal mask of its rows), and an
        explicit mask's rows of it ([.., .., s_local, S], as `split_batch_for_context_parallel` leaves it).
        document_ids [b, S] (the whole sequence, documents.py): each row's statistics over its own document's keys.
        """
        cp_size = context_parallel_size()
        if cp_size == 1:
            docs = None if document_ids is None else (document_ids, document_ids)
            collision, entropy, max_logit = self._row_stats(q, k, softmax_scale, attention_mask, docs)
        else:
            keys = gather_sequence(k, seq_dim=2)
            bounds = cp_chunk_bounds(keys.shape[2], cp_size, context_parallel_rank())
            masks = (None, None) if attention_mask is None else attention_mask.chunk(2, dim=2)  # [.., c, S] each
            docs = [None if document_ids is None else (document_ids[:, start:end], document_ids[:, :end])
                    for start, end in bounds]
            rows = [self._row_stats(part, keys[:, :, :end], softmax_scale, None if mask is None else mask[..., :end],
                                    part_docs)
                    for part, mask, (_, end), part_docs in zip(q.chunk(2, dim=2), masks, bounds, docs)]
            collision, entropy, max_logit = (torch.cat(values, dim=2) for values in zip(*rows))
        heads = slice(head_offset, head_offset + q.shape[1])
        for record, value in ((self.collision, collision.mean((0, 2))), (self.entropy, entropy.mean((0, 2))),
                              (self.max_logit, max_logit.amax((0, 2)))):
            record[layer_index, heads] = value.detach().to("cpu", torch.float64)

    def _row_stats(self, q: Tensor, k: Tensor, softmax_scale: float, attention_mask: Optional[Tensor],
                   documents: Optional[tuple[Tensor, Tensor]] = None):
        """Per-row (collision, entropy, max logit) of queries q, the last q.shape[2] positions of keys k."""
        if self.method == "eager":
            return eager_attention_stats(q, k, softmax_scale, attention_mask=attention_mask, documents=documents)
        return online_attention_stats(q, k, softmax_scale, attention_mask=attention_mask, block_size=self.block_size,
                                      documents=documents)

    def reduce(self) -> dict[str, Tensor]:
        """{stat: [L, H] float64 on the CPU}, complete on every rank.

        Collision and entropy: SUM over tensor-parallel ranks (heads) and pipeline stages (layers) -- each rank
        filled only its own cells -- then MEAN over data-parallel and context-parallel ranks (their micro-batches;
        the CP ranks' rows of the same sequences, as many on each). Max logit: MAX over all of them.
        """
        device = compute_device()
        means = torch.stack([self.collision, self.entropy]).to(device)
        maxes = self.max_logit.to(device)
        if torch.distributed.is_initialized():
            dist = torch.distributed
            mp_group = parallel_state.get_model_parallel_group()
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(means, group=mp_group)
            dist.all_reduce(means, group=dp_group)
            means /= dist.get_world_size(dp_group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=mp_group)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=dp_group)
        means, maxes = means.cpu(), maxes.cpu()
        return {"collision": means[0], "entropy": means[1], "max_logit": maxes}


def attention_summary(stats: dict[str, Tensor]) -> dict[str, float]:
    """Whole-model scalars of reduced [L, H] statistics: mean collision, mean entropy, the lowest head entropy
    and the largest logit (TensorBoard tags `attention/...`)."""
    return {
        "attention/collision": float(stats["collision"].mean()),
        "attention/entropy": float(stats["entropy"].mean()),
        "attention/entropy_min": float(stats["entropy"].min()),
        "attention/max_logit": float(stats["max_logit"].max()),
    }


def per_layer(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer values [L]: mean over heads for collision and entropy, max over heads for the logit."""
    return {"collision": stats["collision"].mean(1), "entropy": stats["entropy"].mean(1),
            "max_logit": stats["max_logit"].amax(1)}
