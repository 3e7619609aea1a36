"""The one function that chooses the kernel of an attention call, from `model.attention_impl` and the call.

Imports no torch: the planner and the config checks ask it too.
"""

from __future__ import annotations

from fpa_megatron.options import ATTENTION_IMPLS, require_one_of


def attention_path(impl: str, compute_penalty: bool, device_type: str, has_mask: bool,
                   has_documents: bool = False) -> str:
    """The kernel that runs one attention call: 'sdpa', 'blockwise', 'triton' or 'eager'.

    `auto` picks the fastest exact one for the call: no penalty -> 'sdpa'; penalty on CUDA -> 'triton'; on
    CPU -> 'blockwise'; an explicit attention_mask (not the causal default) -> 'eager', the only path that
    takes arbitrary masks. With document masking (`has_documents`) -> 'triton' on CUDA, 'blockwise' on CPU,
    penalty or not: they skip the tiles of other documents (SDPA would need an [s, s] mask, and on CPU the
    blockwise kernel without the penalty is faster than SDPA with one: benchmarks/document_mask.py).
    The other impls always run their own kernel (causal only, except eager; every one takes documents).
    """
    require_one_of("model.attention_impl", impl, ATTENTION_IMPLS)
    if has_mask and has_documents:
        raise ValueError("an explicit attention_mask and document masking (data.document_mask) cannot combine")
    if impl == "auto":
        if has_mask:
            return "eager"
        if not compute_penalty and not has_documents:
            return "sdpa"
        return "triton" if device_type == "cuda" else "blockwise"
    if has_mask and impl != "eager":
        raise ValueError(f"model.attention_impl={impl!r} is causal only: the batch's attention_mask must be None "
                         f"(use 'auto' or 'eager' for an explicit mask)")
    return impl
