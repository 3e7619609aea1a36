"""Document masking: packed documents that attend only to themselves.

A packed sample holds several documents joined by EOD. With `data.document_mask` each token attends causally
within its own document only, and positions restart at each document. Documents are described by one integer
per token, its document id: the number of EODs strictly before it (the EOD closes its document, as in
Megatron's `reset_attention_mask`), so ids never decrease along a sequence. They are computed once per
micro-batch (`document_ids`) and every attention call reads them.

Query i sees key j iff j <= i (causal) and doc[i] == doc[j]. Because ids never decrease, the keys one query
block can see form one contiguous range per sample, [first key of its first row's document, its last visible
key]: `key_ranges` gives it per block, so a kernel skips every tile outside it and the work follows the sum of
the squared document lengths, not S^2. Inside a range, a tile that holds a document boundary gets an
elementwise mask (`document_mask`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def document_ids(tokens: Tensor, eod: int) -> Tensor:
    """[..., s] int64: the document of each token, the number of EOD tokens before it (not counting itself)."""
    is_eod = (tokens == eod).to(torch.int64)
    return is_eod.cumsum(-1) - is_eod


def document_positions(doc_ids: Tensor) -> Tensor:
    """[..., s] int64: each token's position inside its document (0 at each document's first token), what
    Megatron's `reset_position_ids` gives for the same EODs."""
    s = doc_ids.shape[-1]
    index = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # each doc's first index
    return index - first


def document_mask(q_docs: Tensor, k_docs: Tensor) -> Tensor:
    """[b, 1, sq, sk] bool, True where query and key belong to different documents (masked); the causal mask
    is separate. For the eager reference and the diagnostics only: O(sq * sk)."""
    return (q_docs[:, :, None] != k_docs[:, None, :]).unsqueeze(1)


def key_ranges(q_docs: Tensor, k_docs: Tensor, block: int, *, causal: bool = True,
               delta: int = 0) -> tuple[Tensor, Tensor]:
    """(lo, hi) [b, n_blocks] int64: per query block of `block` rows, the keys [lo, hi) it may see; lo >= hi
    when it sees none. q_docs [b, sq], k_docs [b, sk] (non-decreasing along the last dim); query row i sits
    `delta` positions after key i (causal: it sees keys j <= i + delta).

    lo = the first key of the block's first row's document; hi = one past the last key of its last row's
    document, cut at the causal limit of its last row."""
    sq, sk = q_docs.shape[-1], k_docs.shape[-1]
    firsts = q_docs[:, ::block].contiguous()  # [b, n_blocks]: each block's first row
    lasts = q_docs[:, torch.arange(block - 1, sq + block - 1, block, device=q_docs.device).clamp(max=sq - 1)]
    k_docs = k_docs.contiguous()
    lo = torch.searchsorted(k_docs, firsts, right=False)
    hi = torch.searchsorted(k_docs, lasts.contiguous(), right=True)
    if causal:
        ends = torch.arange(block, sq + block, block, device=q_docs.device).clamp(max=sq) + delta
        hi = torch.minimum(hi, ends.clamp(min=0, max=sk).expand_as(hi))
    return lo, hi


def split_attention_mask(attention_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(explicit bool mask or None, document ids or None) of the one `attention_mask` argument Megatron hands
    down to the core attention: document masking sends the ids [b, S] through it, as integers."""
    if attention_mask is None or attention_mask.dtype == torch.bool or attention_mask.dtype.is_floating_point:
        return attention_mask, None
    return None, attention_mask


def check_document_ids(doc_ids: Optional[Tensor], batch: int, seq: int) -> None:
    """A clear error for document ids that a kernel cannot use: wrong shape, not integers, decreasing."""
    if doc_ids is None:
        return
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"document ids must be integers, got {doc_ids.dtype}")
    if tuple(doc_ids.shape) != (batch, seq):
        raise ValueError(f"document ids of shape {tuple(doc_ids.shape)}: expected [b, s] = [{batch}, {seq}]")
    if seq > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("document ids decrease along the sequence: they must count the EODs before each token")
