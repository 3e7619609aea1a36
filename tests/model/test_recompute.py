"""Activation recomputation reruns the penalized attention's forward inside backward: same loss, same
penalty (recorded once), same gradients as without recomputation."""

import torch

from fpa_megatron.testing import run_distributed

SEQ, MICRO, VOCAB = 16, 2, 128


def recompute_rank():
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward

    init_model_parallel(1, 1, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2 * MICRO, SEQ + 1), generator=g)
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(MICRO, SEQ),
                    position_ids=torch.arange(SEQ).expand(MICRO, SEQ)) for t in tokens.split(MICRO)]
    out = {}
    for mode in ("none", "selective", "full"):
        mc = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, recompute=mode)
        penalty = make_penalty(mc, FPAConfig())
        model = build_gpt_model(mc, VOCAB, penalty, seed=5)
        penalty.set_step(0.5, True)
        r = forward_backward(model, iter(batches), penalty, num_microbatches=2, micro_batch_size=MICRO,
                             seq_length=SEQ)
        out[mode] = dict(loss=r.lm_loss, matrix=r.penalty_matrix, calls=penalty.calls,
                         grads={n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_recompute_matches_plain():
    out = run_distributed(recompute_rank, 1)[0]
    ref = out["none"]
    assert ref["calls"] == 2 * 2  # 2 layers x 2 micro-batches
    for mode in ("selective", "full"):
        got = out[mode]
        assert got["calls"] == 2 * ref["calls"]  # each forward runs again in backward ...
        torch.testing.assert_close(got["matrix"], ref["matrix"], rtol=1e-6, atol=0)  # ... but counts once
        assert abs(got["loss"] - ref["loss"]) <= 1e-6 * ref["loss"]
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7)
