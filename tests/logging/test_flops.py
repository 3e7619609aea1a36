"""FLOPs per token: a hand count of every GEMM, Megatron-LM's formula, and torch's FLOP counter on a real GPTModel."""

from __future__ import annotations

import math

import pytest

from fpa_megatron.config import ModelConfig
from fpa_megatron.flops import achieved_tflops, flops_per_token, mfu
from fpa_megatron.testing import run_distributed


def test_hand_count_small_gqa_swiglu():
    """L=2, h=64, 4 heads of 16, 2 KV groups, SwiGLU ffn 96, vocab 256, s=32: GEMM by GEMM, forward x 3."""
    mc = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     activation="swiglu", ffn_hidden_size=96, seq_length=32)
    # forward multiply-adds per token, one layer:
    q = 64 * 64  # h -> 4 heads x 16
    kv = 64 * (2 * 2 * 16)  # h -> 2 groups x (k, v) x 16
    scores = 4 * 32 * 16  # 4 heads: q . k for all 32 keys
    context = 4 * 32 * 16  # 4 heads: sum over 32 values of 16 channels
    proj = 64 * 64
    fc1 = 64 * (2 * 96)  # gate and up
    fc2 = 96 * 64
    logits = 64 * 256
    macs = 2 * (q + kv + scores + context + proj + fc1 + fc2) + logits
    assert flops_per_token(mc, 256) == 3 * 2 * macs


def test_hand_count_gpt2_style_and_causal_halving():
    mc = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=2, seq_length=8)
    per_layer = 3 * 32 * 32 + 2 * 8 * 32 + 32 * 32 + 32 * 128 + 128 * 32
    full = 3 * 2 * (3 * per_layer + 32 * 100)
    assert flops_per_token(mc, 100) == full
    assert flops_per_token(mc, 100, causal=True) == full - 3 * 2 * 3 * (8 * 32)  # attention GEMMs halved
    assert flops_per_token(mc, 100, seq_length=16) - full == 3 * 2 * 3 * (2 * 8 * 32)  # longer sequences


def _megatron_lm_formula(L, h, heads, groups, ffn, swiglu, vocab, s):
    """Megatron-LM's num_floating_point_operations(args, batch_size=1) / seq_length, as published."""
    query_ratio = (h // heads) * heads / h
    gated = 3 / 2 if swiglu else 1
    return 12 * s * L * h * h * (
        (1 + groups / heads + s / h) * query_ratio + (ffn / h) * gated + vocab / (2 * L * h)
    ) / s


@pytest.mark.parametrize("options,vocab", [
    (dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=2048), 50304),
    (dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, activation="swiglu",
          ffn_hidden_size=11008, seq_length=4096), 32000),
])
def test_matches_megatron_lm_formula(options, vocab):
    mc = ModelConfig(**options)
    expected = _megatron_lm_formula(mc.num_layers, mc.hidden_size, mc.num_attention_heads,
                                    mc.num_query_groups or mc.num_attention_heads,
                                    mc.ffn_hidden_size or 4 * mc.hidden_size, mc.activation == "swiglu",
                                    vocab, mc.seq_length)
    assert math.isclose(flops_per_token(mc, vocab), expected, rel_tol=1e-12)


def _counted_flops(cases, seq, batch):
    """torch.utils.flop_counter over forward + backward of real Megatron GPTModels (CPU bridge for CUDA spots)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from torch.utils.flop_counter import FlopCounterMode

    from fpa_megatron.model.gpt import transformer_config
    from fpa_megatron.parallel.state import destroy_model_parallel, init_model_parallel

    init_model_parallel(1, 1, seed=0)
    out = []
    for options, vocab in cases:
        mc = ModelConfig(seq_length=seq, **options)
        model = GPTModel(config=transformer_config(mc),
                         transformer_layer_spec=get_gpt_layer_local_spec(normalization=mc.normalization),
                         vocab_size=vocab, max_sequence_length=seq,
                         share_embeddings_and_output_weights=mc.tie_embeddings,
                         position_embedding_type="rope" if mc.position_embedding == "rope" else "learned_absolute")
        tokens = torch.randint(0, vocab, (batch, seq))
        positions = torch.arange(seq).expand(batch, seq)
        mask = torch.triu(torch.ones(1, 1, seq, seq), diagonal=1).bool()
        counter = FlopCounterMode(display=False)
        with counter:
            model(tokens, positions, attention_mask=mask, labels=tokens).sum().backward()
        out.append(counter.get_total_flops())
    destroy_model_parallel()
    return out


def test_matches_torch_flop_counter_on_megatron_gpt():
    cases = [
        (dict(num_layers=2, hidden_size=32, num_attention_heads=4), 128),
        (dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, activation="swiglu",
              normalization="RMSNorm", tie_embeddings=False, ffn_hidden_size=48), 256),
    ]
    seq, batch = 16, 2
    counted = run_distributed(_counted_flops, 1, cases, seq, batch)[0]
    for (options, vocab), flops in zip(cases, counted):
        assert flops_per_token(ModelConfig(seq_length=seq, **options), vocab) * seq * batch == flops, options


def test_mfu_and_tflops():
    assert mfu(100.0, 1e12, peak_tflops=100.0, world_size=2) == pytest.approx(0.5)  # 1e14 / 2e14
    assert mfu(tokens_per_s=2e4, flops_per_token_=6e9, peak_tflops=989.0, world_size=8) == pytest.approx(
        2e4 * 6e9 / (989e12 * 8))
    assert achieved_tflops(2e4, 6e9, world_size=8) == pytest.approx(2e4 * 6e9 / 8 / 1e12)
    assert mfu(1.0, 1.0, peak_tflops=0.0, world_size=1) == 0.0
