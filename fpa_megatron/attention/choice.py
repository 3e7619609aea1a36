"""The one function that chooses the kernel of an attention call, from `model.attention_impl` and the call.

Imports no torch: the planner and the config checks ask it too.
"""

from __future__ import annotations

from fpa_megatron.options import ATTENTION_IMPLS, require_one_of


def attention_path(impl: str, compute_penalty: bool, device_type: str, has_mask: bool) -> str:
    """The kernel that runs one attention call: 'sdpa', 'blockwise', 'triton' or 'eager'.

    `auto` picks the fastest exact one for the call: no penalty -> 'sdpa'; penalty on CUDA -> 'triton'; on
    CPU -> 'blockwise'; an explicit attention_mask (not the causal default) -> 'eager', the only path that
    takes arbitrary masks. The other impls always run their own kernel (causal only, except eager).
    """
    require_one_of("model.attention_impl", impl, ATTENTION_IMPLS)
    if impl == "auto":
        if has_mask:
            return "eager"
        if not compute_penalty:
            return "sdpa"
        return "triton" if device_type == "cuda" else "blockwise"
    if has_mask and impl != "eager":
        raise ValueError(f"model.attention_impl={impl!r} is causal only: the batch's attention_mask must be None "
                         f"(use 'auto' or 'eager' for an explicit mask)")
    return impl
