"""`count_parameters` against real Megatron-core GPTModels, and the GPU presets against their names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpa_megatron.config import ModelConfig, load_config
from fpa_megatron.preflight import check_config
from fpa_megatron.rules import padded_vocab_size
from fpa_megatron.model.param_count import count_non_embedding_parameters, count_parameters, parameter_breakdown
from fpa_megatron.testing import run_distributed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (model options, padded vocabulary): every combination the count distinguishes appears at least once.
CASES = [
    # GPT-2 style: LayerNorm, GeLU (linear biases), rope, tied
    (dict(num_layers=2, hidden_size=32, num_attention_heads=4), 128),
    # LLaMA style: RMSNorm, SwiGLU (no biases), GQA, learned positions with extra rows, untied
    (dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, activation="swiglu",
          normalization="RMSNorm", position_embedding="learned", tie_embeddings=False, ffn_hidden_size=48,
          max_position_embeddings=40), 256),
    # SwiGLU with LayerNorm, multi-query attention, rope, tied
    (dict(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=1, activation="swiglu",
          ffn_hidden_size=80), 384),
    # GeLU with RMSNorm, learned positions, untied, default ffn
    (dict(num_layers=1, hidden_size=64, num_attention_heads=2, normalization="RMSNorm",
          position_embedding="learned", tie_embeddings=False), 128),
    # QK-layernorm: per-head query and key norms, LayerNorm (weight + bias) and RMSNorm (weight)
    (dict(num_layers=2, hidden_size=32, num_attention_heads=4, qk_layernorm=True), 128),
    (dict(num_layers=1, hidden_size=48, num_attention_heads=3, qk_layernorm=True, normalization="RMSNorm",
          activation="swiglu"), 128),
]


def _megatron_counts(cases, via_penalized_spec: bool):
    """Build each GPTModel on this (single) rank; return its number of parameters."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fpa_megatron.config import FPAConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty, transformer_config

    out = []
    for options, vocab in cases:
        mc = ModelConfig(seq_length=16, **options)
        if via_penalized_spec:
            model = build_gpt_model(mc, vocab, make_penalty(mc, FPAConfig()))
        else:
            model = GPTModel(
                config=transformer_config(mc),
                transformer_layer_spec=get_gpt_layer_local_spec(normalization=mc.normalization,
                                                                qk_layernorm=mc.qk_layernorm),
                vocab_size=vocab,
                max_sequence_length=mc.max_position_embeddings or mc.seq_length,
                share_embeddings_and_output_weights=mc.tie_embeddings,
                position_embedding_type="rope" if mc.position_embedding == "rope" else "learned_absolute",
            )
        norms = [(type(layer.self_attention.q_layernorm).__name__, type(layer.self_attention.k_layernorm).__name__,
                  tuple(layer.self_attention.q_layernorm.weight.shape) if mc.qk_layernorm else None)
                 for layer in model.decoder.layers]
        out.append((sum(p.numel() for p in model.parameters()), norms))
    return out


def _both_specs(cases):
    """Megatron's own local spec for every case, and our penalized spec (build_gpt_model) for the first two."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    try:
        return _megatron_counts(cases, False), _megatron_counts(cases[:2] + cases[4:], True)
    finally:
        parallel_state.destroy_model_parallel()


def _tensor_parallel_count(options: dict, vocab: int):
    """Under TP=2: this rank's sharded parameters and its replicated ones (counted once over the group)."""
    from megatron.core import parallel_state

    from fpa_megatron.config import FPAConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty

    parallel_state.initialize_model_parallel(2, 1)
    mc = ModelConfig(seq_length=16, **options)
    model = build_gpt_model(mc, vocab, make_penalty(mc, FPAConfig()))
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    parallel_state.destroy_model_parallel()
    return sharded, replicated


@pytest.fixture(scope="module")
def built_models():
    return run_distributed(_both_specs, 1, CASES)[0]


def test_count_matches_megatron_gpt_models(built_models):
    built, penalized = built_models
    for (options, vocab), (actual, _) in zip(CASES, built):
        assert count_parameters(ModelConfig(seq_length=16, **options), vocab) == actual, options
    assert penalized == built[:2] + built[4:]  # the penalized core attention adds no parameters


def test_qk_layernorm_in_every_layer(built_models):
    """model.qk_layernorm=true: every layer of our GPT normalizes queries and keys over the head dimension
    with the model's norm type; without it they are Megatron's identity."""
    _, penalized = built_models
    _, plain_norms = penalized[0]
    assert plain_norms == [("IdentityOp", "IdentityOp", None)] * 2
    (_, layernorm_norms), (_, rmsnorm_norms) = penalized[2:]
    assert layernorm_norms == [("LayerNorm", "LayerNorm", (8,))] * 2  # hidden 32 / 4 heads
    assert rmsnorm_norms == [("RMSNorm", "RMSNorm", (16,))]  # hidden 48 / 3 heads


def test_count_matches_under_tensor_parallel():
    options = CASES[1][0]
    vocab = padded_vocab_size(200, 2)  # 256: split into two halves of the vocab-parallel layers
    results = run_distributed(_tensor_parallel_count, 2, options, vocab)
    total = sum(sharded for sharded, _ in results) + results[0][1]
    assert results[0][1] == results[1][1]
    assert count_parameters(ModelConfig(seq_length=16, **options), vocab) == total


def test_hand_count_gpt3_small():
    """GPT-3 Small by hand: 12 layers of 12h^2 + 13h, embeddings 50304 x 768, 2048 positions, final LN."""
    mc = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048,
                     position_embedding="learned")
    h = 768
    assert count_parameters(mc, 50304) == 12 * (12 * h * h + 13 * h) + 50304 * h + 2048 * h + 2 * h
    assert count_non_embedding_parameters(mc, 50304) == 12 * (12 * h * h + 13 * h) + 2 * h
    assert set(parameter_breakdown(mc, 50304)) == {"word_embeddings", "position_embeddings", "layers",
                                                   "final_layernorm", "output_layer"}


# Each preset's exact count at its own tensor-parallel size (which sets the vocabulary padding).
PRESET_COUNTS = {
    "gpt_125m.yaml": (125e6, 125_262_336),
    "gpt_1.3b.yaml": (1.3e9, 1_315_819_520),
    "gpt_7b.yaml": (7.0e9, 6_941_839_360),
}


@pytest.mark.parametrize("name", sorted(PRESET_COUNTS))
def test_preset_size_matches_its_name(name):
    nominal, exact = PRESET_COUNTS[name]
    cfg = load_config(CONFIGS / name, ["data.mock=true", "data.tokenizer=null"])
    layout = check_config(cfg, cfg.parallel.tensor * cfg.parallel.pipeline)
    count = count_parameters(cfg.model, layout.padded_vocab_size)
    assert count == exact
    assert abs(count / nominal - 1) < 0.02, f"{name}: {count:,} is not within 2% of {nominal:,.0f}"
