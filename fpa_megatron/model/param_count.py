"""Exact parameter count of our GPT (Megatron-core GPTModel, local layer spec) from the config alone.

Used to name presets honestly and to report model size without building the model. The formula mirrors
`fpa_megatron.model.gpt.transformer_config`: biases on every linear except the output layer iff
`activation == "gelu"` (GPT style; LLaMA style SwiGLU models have no linear biases), LayerNorm with
weight and bias, RMSNorm with weight only, and with `qk_layernorm` one query and one key norm per layer. tests/test_param_count.py checks it against real GPTModels.
"""

from __future__ import annotations

from fpa_megatron.config import ModelConfig


def uses_linear_bias(model_cfg: ModelConfig) -> bool:
    """Whether the linears carry biases; must match `add_bias_linear` in model/gpt.py."""
    return model_cfg.activation != "swiglu"


def parameter_breakdown(model_cfg: ModelConfig, padded_vocab_size: int) -> dict[str, int]:
    """Parameter count per part (one full model, all layers, no tensor/pipeline duplication)."""
    h = model_cfg.hidden_size
    heads = model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or heads
    kv_channels = h // heads
    ffn = model_cfg.ffn_hidden_size or 4 * h
    bias = uses_linear_bias(model_cfg)
    norm = 2 * h if model_cfg.normalization == "LayerNorm" else h  # weight (+ bias for LayerNorm)

    qkv_out = kv_channels * (heads + 2 * groups)
    attention = h * qkv_out + (qkv_out if bias else 0)  # linear_qkv
    attention += heads * kv_channels * h + (h if bias else 0)  # linear_proj
    if model_cfg.qk_layernorm:  # q_layernorm and k_layernorm over the head dimension, shared by all heads
        attention += 2 * (2 * kv_channels if model_cfg.normalization == "LayerNorm" else kv_channels)
    fc1_out = 2 * ffn if model_cfg.activation == "swiglu" else ffn  # gate and up halves for SwiGLU
    mlp = h * fc1_out + (fc1_out if bias else 0)  # linear_fc1
    mlp += ffn * h + (h if bias else 0)  # linear_fc2
    per_layer = norm + attention + norm + mlp  # input_layernorm, self_attention, pre_mlp_layernorm, mlp

    max_positions = model_cfg.max_position_embeddings or model_cfg.seq_length
    parts = {
        "word_embeddings": padded_vocab_size * h,
        "position_embeddings": max_positions * h if model_cfg.position_embedding == "learned" else 0,
        "layers": model_cfg.num_layers * per_layer,
        "final_layernorm": norm,
        "output_layer": 0 if model_cfg.tie_embeddings else padded_vocab_size * h,
    }
    return parts


def count_parameters(model_cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Total number of parameters of the GPT (tied embeddings counted once)."""
    return sum(parameter_breakdown(model_cfg, padded_vocab_size).values())


def count_non_embedding_parameters(model_cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Parameters outside the embeddings and output layer (the "N" of scaling laws)."""
    parts = parameter_breakdown(model_cfg, padded_vocab_size)
    return parts["layers"] + parts["final_layernorm"]
