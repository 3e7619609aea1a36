"""Every allowed-value list of the config, once, and the one check that a value is in its list.

Imports nothing: the config checks, the attention kernels and the planner all read these lists.

`model.attention_impl`:
- `auto`: per call, the fastest exact path for the state of the step: `scaled_dot_product_attention`
  when no penalty is computed, `blockwise` when it is on CPU, the Triton kernel when it is on CUDA.
- `eager`: the reference; materializes [b, h, s, s] (the only one with attention dropout or a custom mask).
- `blockwise`: the tiled O(s)-memory kernel in plain torch, penalty on or off.
- `triton`: the fused Triton kernel, penalty on or off (CUDA only).
"""

from __future__ import annotations

from typing import Any

ATTENTION_IMPLS = ("auto", "eager", "blockwise", "triton")  # model.attention_impl
KERNELS = ("sdpa", "blockwise", "triton", "eager")  # what one attention call runs on (auto's choices)
FPA_TARGETS = ("probs", "logits")  # fpa.target: post-softmax probabilities or pre-softmax scaled scores
FPA_NORMALIZATIONS = ("sum", "mean")  # fpa.normalize
POSITION_EMBEDDINGS = ("rope", "learned")  # model.position_embedding
NORMALIZATIONS = ("LayerNorm", "RMSNorm")  # model.normalization
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")  # model.activation
RECOMPUTE = ("none", "selective", "full")  # model.recompute
DTYPES = ("fp32", "bf16")  # model.dtype
ZERO_STAGES = (1, 2)  # optimizer.zero_stage
LR_SCHEDULES = ("cosine", "wsd", "constant", "inverse_sqrt")  # optimizer.lr_schedule (after the linear warmup)
DECAY_STYLES = ("linear", "cosine", "1-sqrt")  # optimizer.decay_style: the shape of WSD's decay phase
SPIKE_POLICIES = ("warn", "skip", "rollback", "stop")  # train.spike.policy
WANDB_MODES = ("offline", "online")  # logging.wandb.mode
EVAL_SPLITS = ("valid", "test")  # fpa-eval --split: the run's validation or test split


def require_one_of(key: str, value: Any, allowed: tuple) -> None:
    """ValueError naming `key` and its value unless value is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: expected one of {allowed}")
