"""`model.attention_impl: auto`: which kernel each attention call runs (counted, not timed), and that the
SDPA path is exact (GQA included) against the eager reference."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from fpa_megatron.attention import dispatch, triton_attention
from fpa_megatron.attention.choice import attention_path
from fpa_megatron.attention.dispatch import load_triton_attention
from fpa_megatron.attention.reference import eager_attention, sdpa_attention
from fpa_megatron.model.penalized_attention import AttentionPenalty
from fpa_megatron.options import ATTENTION_IMPLS
from fpa_megatron.testing import run_distributed

SEQ, MICRO, NUM_MICRO, VOCAB = 16, 2, 2, 128


# ------------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize("impl,compute,device,mask,expected", [
    ("auto", False, "cpu", False, "sdpa"),
    ("auto", False, "cuda", False, "sdpa"),
    ("auto", True, "cpu", False, "blockwise"),
    ("auto", True, "cuda", False, "triton"),
    ("auto", True, "cpu", True, "eager"),  # an explicit mask: only eager takes arbitrary masks
    ("auto", False, "cuda", True, "eager"),
    ("eager", False, "cpu", False, "eager"),
    ("eager", True, "cpu", True, "eager"),
    ("blockwise", False, "cpu", False, "blockwise"),
    ("blockwise", True, "cuda", False, "blockwise"),
    ("triton", False, "cuda", False, "triton"),
])
def test_attention_path(impl, compute, device, mask, expected):
    assert attention_path(impl, compute, device, mask) == expected


def test_attention_path_rejects_masks_and_unknown_impls():
    for impl in ("blockwise", "triton"):
        with pytest.raises(ValueError, match=f"model.attention_impl='{impl}' is causal only"):
            attention_path(impl, True, "cpu", True)
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        attention_path("flash", True, "cpu", False)
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        AttentionPenalty(2, 2, impl="flash")
    assert AttentionPenalty(2, 2).impl == "auto" and set(ATTENTION_IMPLS) == {"auto", "eager", "blockwise", "triton"}


def test_penalty_is_computed_only_when_active_with_positive_lambda():
    penalty = AttentionPenalty(2, 2)
    for lam, active, expected in [(0.1, True, True), (0.1, False, False), (0.0, True, False), (0.0, False, False)]:
        penalty.set_step(lam, active)
        assert penalty.should_compute is expected


@pytest.fixture
def triton_module_missing(monkeypatch):
    """As if the Triton kernels (and triton) were not installed (None in sys.modules fails the import)."""
    monkeypatch.setitem(sys.modules, "fpa_megatron.attention.triton_kernels", None)
    monkeypatch.setattr(dispatch, "_triton_warnings", set())
    triton_attention._kernels.cache_clear()
    yield
    triton_attention._kernels.cache_clear()


def test_triton_missing_falls_back_with_one_warning_or_fails_when_asked_for(triton_module_missing):
    q, k = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    with pytest.warns(RuntimeWarning, match="falls back to the blockwise kernel") as caught:
        assert load_triton_attention(q, k, required=False) is None
    assert "cannot be imported" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert load_triton_attention(q, k, required=False) is None
    with pytest.raises(ValueError, match="model.attention_impl='triton' cannot run here"):
        load_triton_attention(q, k, required=True)


# ------------------------------------------------------------------------------------------ SDPA is exact


def _qkv(dtype, hq=4, hkv=2, s=13, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, s, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_path_equals_eager_with_gqa(hkv, dtype, tol):
    q, k, v = _qkv(dtype, hkv=hkv)
    grad = torch.randn(2, 4, 13, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = sdpa_attention(q, k, v, 0.3)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want, penalty = eager_attention(q, k, v, 0.3, compute_penalty=False)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    assert penalty is None
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert torch.isfinite(a).all()
        assert float((a - b).detach().norm() / b.detach().norm()) <= tol


# ------------------------------------------------------------------------------------------ inside GPT


def _batches(with_mask: bool = False):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=g)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]
    out = []
    for t in tokens.split(MICRO):
        batch = dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(MICRO, SEQ),
                     position_ids=torch.arange(SEQ).expand(MICRO, SEQ))
        out.append(dict(batch, attention_mask=causal) if with_mask else batch)
    return out


def dispatch_rank(tmp_dir: str):
    """One process, a 2-layer GQA GPT with `auto`: the kernels taken per state of the penalty."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.data.datasets import build_gpt_datasets
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.schedules import LambdaSchedule
    from fpa_megatron.training.evaluator import Evaluator

    cfg = config_from_dict({}, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        f"model.seq_length={SEQ}", f"model.vocab_size={VOCAB}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO * NUM_MICRO}", "train.eval_iters=1", "data.mock=true"])
    layout = check_config(cfg, 1)
    assert cfg.model.attention_impl == "auto"  # the default
    init_model_parallel(1, 1, seed=0)
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, seed=1)

    def step(lam, active, forward_only=False, with_mask=False):
        penalty.path_calls.clear()
        calls = penalty.calls
        penalty.set_step(lam, active)
        model.zero_grad(set_to_none=True)
        result = forward_backward(model, iter(_batches(with_mask)), penalty, num_microbatches=NUM_MICRO,
                                  micro_batch_size=MICRO, seq_length=SEQ, forward_only=forward_only)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return dict(paths=dict(penalty.path_calls), calls=penalty.calls - calls, loss=result.lm_loss,
                    matrix=result.penalty_matrix, grads=grads)

    disabled = LambdaSchedule(0.1, 0.9, enabled=False)
    past_min = LambdaSchedule(1e-2, 0.5, min_lambda=1e-3)
    out = {
        "on": step(0.1, True),
        "disabled": step(disabled.value(), disabled.active()),
        "past_min_lambda": step(past_min.value(10), past_min.active(10)),
        "lambda_zero": step(0.0, True),
        "mask_off": step(0.0, False, with_mask=True),
        "mask_on": step(0.1, True, with_mask=True),
    }
    with torch.no_grad():  # the value is still computed (and recorded) when the step's penalty is on
        out["no_grad_on"] = step(0.1, True, forward_only=True)
        out["no_grad_off"] = step(0.0, False, forward_only=True)
    # The trainer's validation (eval mode, no grad, penalty off) in the middle of a step with FPA on.
    _, valid_ds, _ = build_gpt_datasets([], None, "1,1,1", SEQ, 0, (8, 8, 0), None, tmp_dir, mock=True,
                                        mock_vocab_size=VOCAB)
    penalty.set_step(0.1, True)
    penalty.path_calls.clear()
    Evaluator(cfg, layout, model, None, penalty, valid_ds).evaluate()
    out["evaluation"] = dict(paths=dict(penalty.path_calls), restored=(penalty.lambda_value, penalty.active))

    # Attention dropout has no fast path: the module refuses it (the config check says so first).
    cfg.model.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"model.attention_dropout=0.1 needs model.attention_impl='eager'"):
        build_gpt_model(cfg.model, layout.padded_vocab_size, make_penalty(cfg.model, cfg.fpa))
    return out


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    return run_distributed(dispatch_rank, 1, str(tmp_path_factory.mktemp("mock")))[0]


def test_sdpa_whenever_no_penalty_is_computed(dispatched):
    calls = 2 * NUM_MICRO  # layers x micro-batches
    for state in ("disabled", "past_min_lambda", "lambda_zero", "no_grad_off"):
        assert dispatched[state]["paths"] == {"sdpa": calls}, state
        assert dispatched[state]["calls"] == 0 and float(dispatched[state]["matrix"].abs().sum()) == 0.0, state
    assert dispatched["evaluation"]["paths"] == {"sdpa": calls}  # eval_iters 1: one global batch
    assert dispatched["evaluation"]["restored"] == (0.1, True)


def test_blockwise_when_the_penalty_is_computed_on_cpu(dispatched):
    calls = 2 * NUM_MICRO
    for state in ("on", "no_grad_on"):
        assert dispatched[state]["paths"] == {"blockwise": calls}, state
        assert dispatched[state]["calls"] == calls, state
    on = dispatched["on"]
    assert float(on["matrix"].min()) > 0
    torch.testing.assert_close(dispatched["no_grad_on"]["matrix"], on["matrix"], rtol=1e-12, atol=0)
    # the same LM loss on both paths; only the penalty's gradient differs
    assert abs(on["loss"] - dispatched["lambda_zero"]["loss"]) <= 1e-6 * abs(on["loss"])


def test_explicit_mask_runs_eager_and_matches(dispatched):
    for masked, plain in (("mask_off", "lambda_zero"), ("mask_on", "on")):
        got, want = dispatched[masked], dispatched[plain]
        assert got["paths"] == {"eager": 2 * NUM_MICRO}
        assert abs(got["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"])
        torch.testing.assert_close(got["matrix"], want["matrix"], rtol=1e-5, atol=0)
        assert set(got["grads"]) == set(want["grads"])
        for name, g in want["grads"].items():
            assert float((got["grads"][name] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-12, (masked, name)
