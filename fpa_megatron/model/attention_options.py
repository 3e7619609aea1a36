"""Allowed values of the attention options, in a module that imports nothing (the config checks use it).

`model.attention_impl`:
- `auto`: per call, the fastest exact path for the state of the step: `scaled_dot_product_attention`
  when no penalty is computed, `blockwise` when it is on CPU, the Triton kernel when it is on CUDA.
- `eager`: the reference; materializes [b, h, s, s] (the only one with attention dropout or a custom mask).
- `blockwise`: the tiled O(s)-memory kernel in plain torch, penalty on or off.
- `triton`: the fused Triton kernel, penalty on or off (CUDA only).
"""

ATTENTION_IMPLS = ("auto", "eager", "blockwise", "triton")
FPA_TARGETS = ("probs", "logits")  # fpa.target: post-softmax probabilities or pre-softmax scaled scores
FPA_NORMALIZATIONS = ("sum", "mean")  # fpa.normalize
