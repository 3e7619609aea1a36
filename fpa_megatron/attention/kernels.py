"""Run one attention call on a named kernel, the whole sequence local (no context parallelism).

`run_kernel` maps a kernel name (`options.KERNELS`) to its function; which name a call gets is decided in one
place, `dispatch.attention_path`.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from fpa_megatron.attention.blockwise import blockwise_attention
from fpa_megatron.attention.documents import document_mask
from fpa_megatron.attention.reference import eager_attention, sdpa_attention
from fpa_megatron.attention.triton_attention import triton_attention
from fpa_megatron.options import KERNELS, require_one_of


def run_kernel(kernel: str, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str,
               compute_penalty: bool, block_size: int, attention_mask: Optional[Tensor] = None,
               document_ids: Optional[Tensor] = None,
               dropout: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(out [b, hq, s, d], row penalty [b, hq, s] or None) of causal attention on `kernel`.

    q [b, hq, s, d], k/v [b, hkv, s, d]. `attention_mask` and `dropout` are taken by 'eager' only; 'sdpa'
    computes no penalty and takes no `document_ids` [b, s] (documents.py); eager builds their mask.
    """
    require_one_of("kernel", kernel, KERNELS)
    if kernel == "sdpa":
        if document_ids is not None:
            raise ValueError("kernel 'sdpa' takes no document ids")
        return sdpa_attention(q, k, v, softmax_scale), None
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, softmax_scale, target=target, compute_penalty=compute_penalty,
                                   block_size=block_size, document_ids=document_ids)
    if kernel == "triton":
        return triton_attention(q, k, v, softmax_scale, target=target, compute_penalty=compute_penalty,
                                document_ids=document_ids)
    if document_ids is not None:
        attention_mask = document_mask(document_ids, document_ids)
    return eager_attention(q, k, v, softmax_scale, target=target, compute_penalty=compute_penalty,
                           attention_mask=attention_mask, dropout=dropout)
