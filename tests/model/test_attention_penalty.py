"""The penalty's values and gradients against independent float64 references, and its gradient path in GPT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fpa_megatron.attention.reference import eager_attention
from fpa_megatron.testing import run_distributed


def _reference(q, k, v, scale, target):
    """Explicit causal softmax in float64 numpy: out [b,h,s,d], row penalty [b,h,s], dpen/dq, dpen/dk (sum of rows)."""
    q, k, v = (np.asarray(t.detach(), dtype=np.float64) for t in (q, k, v))
    b, h, s, d = q.shape
    group = h // k.shape[1]
    out = np.zeros((b, h, s, d))
    pen = np.zeros((b, h, s))
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // group], v[bi, hi // group]
            for i in range(s):
                scores = scale * kh[: i + 1] @ q[bi, hi, i]  # only j <= i exist for a causal row
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, hi, i] = p @ vh[: i + 1]
                if target == "probs":
                    c = (p * p).sum()
                    ds = 2 * p * (p - c)  # d c_i / d s_ij
                else:
                    c = (scores * scores).sum()
                    ds = 2 * scores
                pen[bi, hi, i] = c
                dq[bi, hi, i] += scale * ds @ kh[: i + 1]
                dk[bi, hi // group, : i + 1] += scale * np.outer(ds, q[bi, hi, i])
    return out, pen, dq, dk


def _inputs(dtype, b=2, hq=4, hkv=2, s=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("target", ["probs", "logits"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_values_and_gradients_match_float64_reference(target, dtype, tol):
    q, k, v = _inputs(dtype)
    scale = 1 / math.sqrt(5)
    out, pen = eager_attention(q, k, v, scale, target=target)
    pen.sum().backward()
    ref_out, ref_pen, ref_dq, ref_dk = _reference(q, k, v, scale, target)

    def rel(a, b):
        return np.linalg.norm(a.detach().double().numpy() - b) / np.linalg.norm(b)

    assert rel(out, ref_out) <= tol
    assert rel(pen, ref_pen) <= tol
    assert rel(q.grad, ref_dq) <= tol
    assert rel(k.grad, ref_dk) <= tol
    assert v.grad is None or float(v.grad.abs().max()) == 0.0  # the penalty does not depend on V
    if target == "probs":  # bounds of the collision probability: 1/(i+1) <= c_i <= 1
        i = np.arange(7)
        assert np.all(ref_pen >= 1 / (i + 1) - 1e-12) and np.all(ref_pen <= 1 + 1e-12)


def test_lse_identity_for_collision_probability():
    q, k, v = _inputs(torch.float64)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(5)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    c = torch.exp(torch.logsumexp(2 * scores, -1) - 2 * torch.logsumexp(scores, -1))
    _, pen = eager_attention(q, k, v, 1 / math.sqrt(5))
    torch.testing.assert_close(c, pen, rtol=1e-14, atol=0)


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_gradcheck(target):
    q, k, v = _inputs(torch.float64, b=1, hq=2, hkv=1, s=5, d=3)
    weights = torch.rand(1, 2, 5, dtype=torch.float64)

    def fn(q, k, v):
        out, pen = eager_attention(q, k, v, 0.7, target=target)
        return out, (pen * weights).sum()

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_penalty_off_returns_none_and_same_output():
    q, k, v = _inputs(torch.float64)
    out_on, _ = eager_attention(q, k, v, 0.5)
    out_off, pen = eager_attention(q, k, v, 0.5, compute_penalty=False)
    assert pen is None
    torch.testing.assert_close(out_on, out_off, rtol=0, atol=0)


# --- the whole gradient path inside GPT: lambda * dF/dtheta against finite differences of F in float64 ---------------

SEQ, MICRO, NUM_MICRO, VOCAB = 8, 2, 3, 64


def _batches():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=g)
    return [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(MICRO, SEQ),
                 position_ids=torch.arange(SEQ).expand(MICRO, SEQ)) for t in tokens.split(MICRO)]


def gradient_path_rank(pp: int, normalize: str):
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.penalized_attention import PenalizedDotProductAttention
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.schedules import LambdaSchedule

    init_model_parallel(1, pp, seed=7)
    mc = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=SEQ, dtype="fp64")
    penalty = make_penalty(mc, FPAConfig(normalize=normalize))
    model = build_gpt_model(mc, VOCAB, penalty)
    assert all(type(layer.self_attention.core_attention) is PenalizedDotProductAttention
               for layer in model.decoder.layers)
    lam = 0.7

    def run(lam_value, forward_only):
        penalty.set_step(lam_value, lam_value > 0)
        return forward_backward(model, iter(_batches()), penalty, num_microbatches=NUM_MICRO,
                                micro_batch_size=MICRO, seq_length=SEQ, forward_only=forward_only)

    # Megatron computes the cross entropy in float32, so J itself is not float64-smooth; the penalty F is.
    # The LM part of the gradient cancels in G(lambda) - G(0) (the forward is identical), leaving lambda dF.
    params = list(model.parameters())
    grads = []
    for lam_value in (lam, 0.0):
        model.zero_grad(set_to_none=True)
        run(lam_value, False)
        grads.append([p.grad.clone() for p in params])
    g = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    # The last stage's copy of the tied embeddings holds the summed gradient; move only the first stage's.
    direction = [d * 0 if getattr(p, "shared", False) else d for p, d in zip(params, direction)]
    # Every stage moves its own parameters along `direction`: the directional derivative sums over stages.
    analytic = torch.tensor(sum(float(((g1 - g0) * d).sum()) for g1, g0, d in zip(*grads, direction)) / lam)
    torch.distributed.all_reduce(analytic)
    analytic = float(analytic)
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
    plus = run(1.0, True).penalty
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
    minus = run(1.0, True).penalty
    numeric = (plus - minus) / (2 * eps)

    # Past min_lambda the penalty is not computed at all, yet training still runs.
    sched = LambdaSchedule(lambda0=1e-3, gamma=0.5, min_lambda=1e-4)
    calls = []
    for _ in range(5):
        before = penalty.calls
        penalty.set_step(sched.value(), sched.active())
        forward_backward(model, iter(_batches()), penalty, num_microbatches=NUM_MICRO,
                         micro_batch_size=MICRO, seq_length=SEQ)
        calls.append(penalty.calls - before)
        sched.advance()
    return analytic, numeric, calls, len(model.decoder.layers)


@pytest.mark.parametrize("pp,normalize", [(1, "sum"), (2, "mean")])
def test_penalty_gradient_matches_finite_differences(pp, normalize):
    for analytic, numeric, calls, local_layers in run_distributed(gradient_path_rank, pp, pp, normalize):
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
        # lambda = 1e-3, 5e-4, 2.5e-4, 1.25e-4 are >= min_lambda 1e-4; 6.25e-5 is not.
        assert calls == [local_layers * NUM_MICRO] * 4 + [0]
