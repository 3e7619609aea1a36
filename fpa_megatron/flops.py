"""Model FLOPs per trained token and MFU, with Megatron-LM's `num_floating_point_operations` convention.

Counted: every GEMM of the model (QKV, attention scores Q K^T, probabilities x V, output projection, MLP with
the SwiGLU gate, logits), 2 FLOPs per multiply-add, times 3 for forward + backward (the backward does the
data-gradient and the weight-gradient GEMM). GQA shrinks the K/V projections only. The attention GEMMs are
counted over the full S x S matrix (2 * 2 * s * h per layer and token in the forward), as Megatron-LM did
until it started halving them for causal masks; pass causal=True for the halved count. Not counted: norms,
softmax, activations, the FPA penalty's squares and sums (O(s) per row), and recompute (MFU, not HFU).
"""

from __future__ import annotations

from fpa_megatron.config import ModelConfig


def flops_per_token(model_cfg: ModelConfig, padded_vocab_size: int, seq_length: int | None = None,
                    causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token of a sequence of seq_length (default model.seq_length)."""
    s = seq_length or model_cfg.seq_length
    h = model_cfg.hidden_size
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    kv_channels = h // heads
    q_size = heads * kv_channels
    ffn = model_cfg.ffn_hidden_size or 4 * h
    gated = 2 if model_cfg.activation == "swiglu" else 1

    qkv = 2 * h * (q_size + 2 * groups * kv_channels)
    scores_and_values = 2 * 2 * s * q_size * (0.5 if causal else 1.0)  # Q K^T and P V
    proj = 2 * q_size * h
    mlp = 2 * h * ffn * gated + 2 * ffn * h
    per_layer = qkv + scores_and_values + proj + mlp
    logits = 2 * h * padded_vocab_size
    forward = model_cfg.num_layers * per_layer + logits
    return 3.0 * forward


def achieved_tflops(tokens_per_s: float, flops_per_token_: float, world_size: int = 1) -> float:
    """Model TFLOP/s per device."""
    return tokens_per_s * flops_per_token_ / world_size / 1e12


def mfu(tokens_per_s: float, flops_per_token_: float, peak_tflops: float, world_size: int) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over world_size * peak (TFLOP/s per device)."""
    if peak_tflops <= 0 or world_size <= 0:
        return 0.0
    return tokens_per_s * flops_per_token_ / (peak_tflops * 1e12 * world_size)
