"""Every (TP, PP) layout trains the same function as one process: LM loss, penalty, [L, H] matrix, gradients.

The single-process run draws the weights; each layout loads those global weights into its shards, runs the
same global batch as 2 micro-batches through Megatron's schedule (1F1B when PP > 1) on real gloo ranks,
and gathers its gradients back to global names.
"""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.testing import run_distributed

SEQ, MICRO, NUM_MICRO, VOCAB = 16, 2, 2, 128
LAMBDAS = (0.0, 0.3)

VARIANTS = {
    # GPT-2 style: LayerNorm, GeLU, rope, tied embeddings (the tied copy crosses pipeline stages).
    "gpt2_probs": dict(model=dict(num_layers=4, hidden_size=32, num_attention_heads=4), target="probs", normalize="sum"),
    # LLaMA style: RMSNorm, SwiGLU, GQA, learned positions, untied, logits target, mean normalization.
    "llama_logits": dict(
        model=dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, activation="swiglu",
                   normalization="RMSNorm", position_embedding="learned", tie_embeddings=False, ffn_hidden_size=48),
        target="logits", normalize="mean",
    ),
}


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=g)
    out = []
    for i in range(NUM_MICRO):
        t = tokens[i * MICRO:(i + 1) * MICRO]
        mask = torch.ones(MICRO, SEQ)
        mask[0, :3] = 0.0  # some masked tokens: the loss is a masked mean
        out.append(dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=mask,
                        position_ids=torch.arange(SEQ).expand(MICRO, SEQ)))
    return out


def _model(variant: dict, impl: str = "eager", sequence_parallel: bool = False):
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty

    mc = ModelConfig(seq_length=SEQ, attention_impl=impl, attention_block_size=8, **variant["model"])
    penalty = make_penalty(mc, FPAConfig(target=variant["target"], normalize=variant["normalize"]))
    return build_gpt_model(mc, VOCAB, penalty, sequence_parallel=sequence_parallel), penalty


def _run(model, penalty, lam: float):
    from fpa_megatron.parallel.weights import gather_global
    from fpa_megatron.training.forward_backward import forward_backward

    model.zero_grad(set_to_none=True)
    penalty.set_step(lam, lam > 0)
    calls_before = penalty.calls
    result = forward_backward(model, iter(_batches()), penalty, num_microbatches=NUM_MICRO,
                              micro_batch_size=MICRO, seq_length=SEQ)
    grads = gather_global(model, {n: p.grad for n, p in model.named_parameters()})
    return dict(loss=result.lm_loss, penalty=result.penalty, matrix=result.penalty_matrix, grads=grads,
                calls=penalty.calls - calls_before)


def reference_rank(variant_names):
    """TP=1, PP=1: draws the weights, runs every lambda, and also Megatron's own (unpenalized) attention."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.model.penalized_attention import PenalizedDotProductAttention

    init_model_parallel(1, 1, seed=1234)
    out = {}
    for name in variant_names:
        model, penalty = _model(VARIANTS[name])
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        assert len(cores) == VARIANTS[name]["model"]["num_layers"]
        assert all(type(c) is PenalizedDotProductAttention for c in cores)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        runs = {lam: _run(model, penalty, lam) for lam in LAMBDAS}
        # Megatron's stock DotProductAttention with the same weights: what lambda = 0 must reproduce.
        plain = GPTModel(config=model.config, transformer_layer_spec=get_gpt_layer_local_spec(
            normalization=model.config.normalization), vocab_size=VOCAB, max_sequence_length=SEQ,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type)
        plain.load_state_dict(model.state_dict(), strict=False)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]  # stock attention wants a mask on CPU
        batches = [dict(b, attention_mask=causal) for b in _batches()]
        plain_result = forward_backward(plain, iter(batches), penalty, num_microbatches=NUM_MICRO,
                                        micro_batch_size=MICRO, seq_length=SEQ)
        plain_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
        out[name] = dict(state=state, runs=runs, plain_loss=plain_result.lm_loss, plain_grads=plain_grads)
    return out


def layout_rank(tp, pp, variant_names, states, impl):
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import load_global_state

    init_model_parallel(tp, pp, seed=999)  # a different seed: the weights must come from the reference
    out = {}
    for name in variant_names:
        model, penalty = _model(VARIANTS[name], impl)
        load_global_state(model, states[name])
        out[name] = {}
        for lam in LAMBDAS:
            penalty.path_calls.clear()
            out[name][lam] = dict(_run(model, penalty, lam), paths=dict(penalty.path_calls))
    return out


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def reference():
    return run_distributed(reference_rank, 1, list(VARIANTS))[0]


def test_lambda_zero_equals_megatron_attention(reference):
    for name, ref in reference.items():
        run = ref["runs"][0.0]
        # lambda = 0: the penalty is not computed at all (no layer ran it), while lambda > 0 computes it in
        # every layer for every micro-batch; the LM loss and gradients are then Megatron's own
        assert run["calls"] == 0, (name, run["calls"])
        assert ref["runs"][0.3]["calls"] == VARIANTS[name]["model"]["num_layers"] * NUM_MICRO
        assert not run["matrix"].any() and ref["runs"][0.3]["matrix"].gt(0).all()
        assert abs(run["loss"] - ref["plain_loss"]) <= 1e-6 * abs(ref["plain_loss"])
        for pname, g in ref["plain_grads"].items():
            assert _rel(run["grads"][pname], g) <= 1e-6, (name, pname)


def test_penalty_changes_gradients(reference):
    """Sanity for the comparisons below: lambda > 0 moves the attention gradients (not a no-op)."""
    for ref in reference.values():
        g0, g1 = ref["runs"][0.0]["grads"], ref["runs"][0.3]["grads"]
        qkv = [n for n in g0 if "linear_qkv.weight" in n]
        assert qkv and all(_rel(g1[n], g0[n]) > 1e-3 for n in qkv)
        assert ref["runs"][0.3]["penalty"] > 0


def _expected_paths(impl: str, lam: float, local_layers: int) -> dict:
    """Attention calls per kernel on one rank: `auto` runs SDPA without the penalty and blockwise with it."""
    path = {"auto": "blockwise" if lam > 0 else "sdpa"}.get(impl, impl)
    return {path: local_layers * NUM_MICRO}


# Against the eager single-process reference. `auto` runs SDPA at lambda 0 and, on CPU, the blockwise kernel
# at lambda > 0 (the path counts say so): it covers `blockwise` inside the model too.
@pytest.mark.parametrize("tp,pp,impl", [(2, 1, "eager"), (1, 2, "eager"), (2, 2, "eager"),
                                        (2, 1, "auto"), (1, 2, "auto")])
def test_layout_matches_single_process(reference, tp, pp, impl):
    states = {name: ref["state"] for name, ref in reference.items()}
    got = run_distributed(layout_rank, tp * pp, tp, pp, list(VARIANTS), states, impl)
    for rank_out in got:  # every rank holds the reduced values
        for name, ref in reference.items():
            for lam in LAMBDAS:
                mine, want = rank_out[name][lam], ref["runs"][lam]
                assert mine["paths"] == _expected_paths(impl, lam, VARIANTS[name]["model"]["num_layers"] // pp)
                assert _rel(mine["loss"], want["loss"]) <= 1e-5, (name, lam)
                if lam > 0:
                    assert _rel(mine["penalty"], want["penalty"]) <= 1e-5, (name, lam)
                    assert mine["matrix"].shape == want["matrix"].shape
                    assert _rel(mine["matrix"], want["matrix"]) <= 1e-5, (name, lam)
                assert set(mine["grads"]) == set(want["grads"])
                for pname, g in want["grads"].items():
                    assert _rel(mine["grads"][pname], g) <= 1e-5, (name, lam, pname)


def init_rank(tp, pp, variant_names):
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import gather_global

    init_model_parallel(tp, pp, seed=tp * 10 + pp)  # Megatron's streams differ; the init must not care
    out = {}
    for name in variant_names:
        mc = ModelConfig(seq_length=SEQ, **VARIANTS[name]["model"])
        model = build_gpt_model(mc, VOCAB, make_penalty(mc, FPAConfig()), seed=42)
        out[name] = gather_global(model, {n: p.detach() for n, p in model.named_parameters()})
    return out


def test_seeded_init_is_the_same_model_in_every_layout():
    ref = run_distributed(init_rank, 1, 1, 1, list(VARIANTS))[0]
    for tp, pp in [(2, 1), (2, 2)]:
        got = run_distributed(init_rank, tp * pp, tp, pp, list(VARIANTS))[0]
        for name in VARIANTS:
            assert set(got[name]) == set(ref[name])
            for pname, value in ref[name].items():
                assert torch.equal(got[name][pname], value), (name, pname)
            std = ref[name]["decoder.layers.0.self_attention.linear_qkv.weight"].std()
            assert abs(float(std) - 0.02) < 0.002  # normal(0, init_std)
