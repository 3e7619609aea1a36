"""Attention diagnostics: collision, entropy and max logit against a float64 softmax reference, for the
explicit and the online (key-tile) formulation, and inside the GPT: every layout gives the single process's
[L, H] statistics (TP2, PP2, DP2), and the measurement leaves training untouched."""

from __future__ import annotations

import math

import pytest
import torch

from fpa_megatron.attention.stats import (
    AttentionStats, attention_summary, eager_attention_stats, online_attention_stats, per_layer,
)
from fpa_megatron.testing import run_distributed


def reference_stats(q, k, scale, mask=None):
    """float64, one head at a time: the explicit masked softmax, then sum p^2, -sum p log p, max s."""
    q, k = q.double(), k.double()
    b, hq, s, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(3, b, hq, s, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            scores = q[bi, h] @ k[bi, h // group].T * scale  # [s, s]
            masked = torch.ones(s, s, dtype=torch.bool).triu(1)
            if mask is not None:
                masked = masked | mask[bi if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0]
            for i in range(s):
                row = scores[i][~masked[i]]
                p = torch.softmax(row, dim=0)
                out[0, bi, h, i] = (p * p).sum()
                out[1, bi, h, i] = -(p * torch.log(p)).sum()
                out[2, bi, h, i] = row.max()
    return out


def _inputs(b, hq, hkv, s, d, dtype, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64) * spread
    return q.to(dtype), k.to(dtype)


METHODS = {
    "eager": lambda q, k, scale, mask: eager_attention_stats(q, k, scale, attention_mask=mask),
    "online": lambda q, k, scale, mask: online_attention_stats(q, k, scale, attention_mask=mask, block_size=8),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("hq,hkv,s", [(2, 2, 37), (4, 2, 23), (3, 1, 8), (2, 2, 1)], ids=["mha37", "gqa23", "mqa8", "s1"])
def test_stats_match_float64_softmax(method, dtype, tol, hq, hkv, s):
    q, k = _inputs(2, hq, hkv, s, 8, dtype, seed=s)
    got = METHODS[method](q, k, 0.4, None)
    want = reference_stats(q, k, 0.4)
    for name, x, y in zip(("collision", "entropy", "max_logit"), got, want):
        assert x.shape == (2, hq, s) and torch.isfinite(x).all(), name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, equal_nan=False, msg=name)
    # the bounds: 1/(i+1) <= c_i <= 1 and 0 <= H_i <= log(i+1)
    rows = torch.arange(1, s + 1, dtype=torch.float64)
    assert (got[0].double() >= 1 / rows - tol).all() and (got[0] <= 1 + tol).all()
    assert (got[1].double() <= torch.log(rows) + tol).all() and (got[1] >= -tol).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_stats_with_an_explicit_mask(method):
    """A padding-like bool mask on top of the causal one (column 0 always visible)."""
    q, k = _inputs(2, 4, 2, 19, 8, torch.float64, seed=3)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 1, 19, 19, generator=g) < 0.3
    mask[..., 0] = False
    got = METHODS[method](q, k, 0.5, mask)
    want = reference_stats(q, k, 0.5, mask)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, equal_nan=False)


def test_online_entropy_stays_accurate_for_large_logits():
    """Logits around +-100 and rows close to one-hot: float32 tiles still give the float64 entropy to 1e-4
    absolute (an unshifted weighted sum would lose it in m + log l - w / l)."""
    q, k = _inputs(1, 2, 2, 64, 16, torch.float32, seed=7, spread=4.0)
    collision, entropy, max_logit = online_attention_stats(q, k, 1.0, block_size=16)
    want = reference_stats(q, k, 1.0)
    assert want[2].abs().max() > 50 and want[0].mean() > 0.5  # the regime this test is about
    torch.testing.assert_close(entropy.double(), want[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(collision.double(), want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(max_logit.double(), want[2], rtol=1e-6, atol=1e-4)  # float32 dot products


def test_record_places_heads_at_global_indices_and_summaries():
    stats = AttentionStats(num_layers=3, num_heads=4, method="online", block_size=4)
    q, k = _inputs(2, 2, 1, 9, 8, torch.float64, seed=11)
    stats.observe(1, 2, q, k, 0.3)  # layer 1, heads 2 and 3 (e.g. tensor-parallel rank 1 of 2)
    want = reference_stats(q, k, 0.3)
    reduced = stats.reduce()  # no process group: the record as is
    torch.testing.assert_close(reduced["collision"][1, 2:], want[0].mean((0, 2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(reduced["entropy"][1, 2:], want[1].mean((0, 2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(reduced["max_logit"][1, 2:], want[2].amax((0, 2)), rtol=1e-12, atol=0)
    assert (reduced["collision"][0] == 0).all() and (reduced["max_logit"][0] == -math.inf).all()
    full = {name: torch.arange(12, dtype=torch.float64).reshape(3, 4) for name in ("collision", "entropy", "max_logit")}
    assert attention_summary(full) == {"attention/collision": 5.5, "attention/entropy": 5.5,
                                       "attention/entropy_min": 0.0, "attention/max_logit": 11.0}
    layers = per_layer(full)
    assert layers["collision"].tolist() == [1.5, 5.5, 9.5] and layers["max_logit"].tolist() == [3.0, 7.0, 11.0]


# ---------------------------------------------------------------------------------------------- in the GPT

SEQ, MICRO, VOCAB = 23, 2, 128  # an odd length: the last key tile (block 8) is short
MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
             attention_block_size=8, init_std=0.3)  # large weights: peaked, different heads (not uniform)


def _samples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return [dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ), position_ids=torch.arange(SEQ))
            for t in tokens]


def _measure(tp, pp, impl, samples, state=None):
    """Build the GPT in this layout (weights from `state`, or seeded), FPA on, and run the diagnostics probe."""
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import gather_global, load_global_state
    from fpa_megatron.training.attention_diagnostics import AttentionDiagnostics

    init_model_parallel(tp, pp, seed=77)
    mc = ModelConfig(attention_impl=impl, **MODEL)
    penalty = make_penalty(mc, FPAConfig(lambda0=0.5))
    model = build_gpt_model(mc, VOCAB, penalty, seed=5)
    if state is not None:
        load_global_state(model, state)
    penalty.set_step(0.5, True)
    diagnostics = AttentionDiagnostics(10, model, None, penalty, None, samples, MICRO, SEQ)
    assert diagnostics.maybe_measure(3) is None  # not on the cadence
    stats = diagnostics.maybe_measure(7, final=True)
    assert (penalty.lambda_value, penalty.active, model.training) == (0.5, True, True)  # restored
    assert penalty.calls == 0  # the probe computed no penalty
    state = gather_global(model, {n: p.detach() for n, p in model.named_parameters()})
    return stats, state


def reference_rank(samples):
    """One process: the stats with the explicit (eager) and the online (blockwise) formulation, on the probe
    micro-batch and on the second micro-batch (what DP rank 1 sees)."""
    eager, state = _measure(1, 1, "eager", samples)
    online, _ = _measure(1, 1, "blockwise", samples, state)
    second, _ = _measure(1, 1, "eager", samples[MICRO:], state)
    return dict(eager=eager, online=online, second=second, state=state)


def layouts_rank(samples, state):
    return {(tp, pp, impl): _measure(tp, pp, impl, samples, state)[0]
            for tp, pp, impl in [(2, 1, "eager"), (1, 2, "eager"), (2, 1, "blockwise"), (1, 1, "eager")]}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(reference_rank, 1, _samples(2 * MICRO))[0]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_single_process_eager_and_online_agree(reference):
    eager, online = reference["eager"], reference["online"]
    for name in ("collision", "entropy", "max_logit"):
        assert eager[name].shape == (4, 4) and torch.isfinite(eager[name]).all(), name
        assert _rel(online[name], eager[name]) <= 1e-5, name
    assert (eager["collision"] > 1 / SEQ).all() and (eager["entropy"] > 0).all()
    # every head differs from the others: a misplaced head index cannot pass the layout comparisons
    for name in ("collision", "entropy", "max_logit"):
        values = eager[name].flatten()
        gaps = (values[:, None] - values[None, :]).abs() + torch.eye(len(values)) * 1e9
        assert gaps.min() > 1e-4 * values.abs().max(), name


def test_layouts_equal_single_process(reference):
    """TP2 and PP2 (eager and blockwise) equal one process (<= 1e-5); under DP2 each rank probes its own
    micro-batch: mean of collision and entropy, max of the logit over the two."""
    got = run_distributed(layouts_rank, 2, _samples(2 * MICRO), reference["state"])
    first, second = reference["eager"], reference["second"]
    for rank_out in got:  # every rank holds the reduced values
        for layout, stats in rank_out.items():
            if layout == (1, 1, "eager"):  # DP2
                want = {"collision": (first["collision"] + second["collision"]) / 2,
                        "entropy": (first["entropy"] + second["entropy"]) / 2,
                        "max_logit": torch.maximum(first["max_logit"], second["max_logit"])}
            else:
                want = first
            for name in ("collision", "entropy", "max_logit"):
                assert _rel(stats[name], want[name]) <= 1e-5, (layout, name)
    assert _rel(first["collision"], second["collision"]) > 1e-3  # the DP case is not trivially equal
