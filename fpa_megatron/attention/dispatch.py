"""Run one attention call on the kernel `choice.attention_path` picks.

`attend` applies the choice, falls back from Triton to blockwise where the Triton kernel cannot run (one warning
per reason), and runs the kernel on the whole local sequence or, under context parallelism, across the CP ranks'
key chunks.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from fpa_megatron.attention.choice import attention_path
from fpa_megatron.attention.context_parallel import context_parallel_attention
from fpa_megatron.attention.kernels import run_kernel
from fpa_megatron.attention.triton_attention import triton_attention, triton_attention_supported


_triton_warnings: set = set()


def load_triton_attention(q: Tensor, k: Tensor, required: bool) -> Optional[Callable]:
    """`triton_attention` if the Triton kernel can run on q, k; else None after one warning per reason
    (`auto` falls back to blockwise), or ValueError when the config asked for `triton` itself."""
    supported, reason = triton_attention_supported(q, k)
    if supported:
        return triton_attention
    if required:
        raise ValueError(f"model.attention_impl='triton' cannot run here: {reason}")
    if reason not in _triton_warnings:
        _triton_warnings.add(reason)
        warnings.warn(f"model.attention_impl='auto': the Triton FPA kernel cannot run ({reason}); "
                      f"the penalized attention falls back to the blockwise kernel", RuntimeWarning, stacklevel=2)
    return None


def attend(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, impl: str, target: str, compute_penalty: bool,
           block_size: int, attention_mask: Optional[Tensor] = None, document_ids: Optional[Tensor] = None,
           cp_group=None, dropout: Optional[Callable[[Tensor], Tensor]] = None
           ) -> tuple[str, Tensor, Optional[Tensor]]:
    """(kernel taken, out [b, hq, s, d], row penalty [b, hq, s] or None) of one causal attention call.

    q [b, hq, s, d], k/v [b, hkv, s, d] in [b, h, s, d] layout. cp_group: the context-parallel group when the
    sequence is split over CP ranks (None: the whole sequence is local). document_ids [b, S] (documents.py):
    document masking, the ids of the WHOLE sequence (every CP rank's tokens, in sequence order). dropout:
    eager only.
    """
    path = attention_path(impl, compute_penalty, q.device.type, attention_mask is not None,
                          document_ids is not None)
    if path == "triton" and load_triton_attention(q, k, required=impl == "triton") is None:
        path = "blockwise"
    kernel_args = dict(target=target, compute_penalty=compute_penalty, block_size=block_size,
                       attention_mask=attention_mask, document_ids=document_ids)
    with torch.profiler.record_function(f"fpa/attention/{path}"):  # a named range when a profiler traces
        if cp_group is not None:  # the same kernel, run across the CP ranks' key chunks
            return path, *context_parallel_attention(q, k, v, softmax_scale, cp_group=cp_group, kernel=path,
                                                     **kernel_args)
        return path, *run_kernel(path, q, k, v, softmax_scale, dropout=dropout, **kernel_args)
