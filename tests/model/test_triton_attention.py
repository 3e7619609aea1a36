"""The fused Triton attention kernels against the float64 eager reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them); with CUDA they run compiled on the GPU. Each case checks the
output, the per-row penalty and the gradients of q, k, v for a random upstream gradient of both the output and
the penalty, within 1e-5 relative in float32. The interpreter is slow, so every case covers several features
at once: GQA, odd lengths (a ragged last tile), causal and not, both targets, head dims 8 to 256.
"""

from __future__ import annotations

import os

import pytest
import torch

from fpa_megatron.attention.reference import eager_attention
from fpa_megatron.attention.blockwise import blockwise_attention
from fpa_megatron.attention.triton_attention import triton_attention, triton_attention_supported

os.environ.setdefault("FPA_TRITON_AUTOTUNE", "0")  # on a GPU: one tile config per kernel, a few compiles only
triton_kernels = pytest.importorskip("fpa_megatron.attention.triton_kernels")
if triton_kernels.INTERPRETING:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA and the Triton kernels were not decorated under TRITON_INTERPRET=1",
                allow_module_level=True)

NAMES = ("out", "penalty", "dq", "dk", "dv")


def make_inputs(b, hq, hkv, s, d, seed=0):
    """float64 q, k, v and upstream gradients of the output and of the row penalty."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    grad_penalty = torch.randn(b, hq, s, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, grad_out, grad_penalty)]


def run(fn, q, k, v, grad_out, grad_penalty, dtype, **kwargs):
    """Forward on `dtype` copies, backward of sum(out * grad_out) + sum(penalty * grad_penalty).

    Returns (out, penalty, dq, dk, dv) as float64; grad_out / grad_penalty None leave that term out.
    """
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, penalty = fn(*leaves, **kwargs)
    loss = 0.0
    if grad_out is not None:
        loss = loss + (out.double() * grad_out).sum()
    if penalty is not None and grad_penalty is not None:
        loss = loss + (penalty.double() * grad_penalty).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # eager: v unused when only the penalty counts
    grads = [torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, grads)]
    return [None if t is None else t.detach().double() for t in (out, penalty, *grads)]


def rel_err(got, ref):
    """max |got - ref| / max |ref|; NaN or inf anywhere in got fails."""
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close_all(got, ref, tol, names=NAMES):
    errors = {n: rel_err(g, r) for n, g, r in zip(names, got, ref) if r is not None}
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} (tolerance {tol})"
    return errors


# name: (b, hq, hkv, s, d, target, causal)
CASES = {
    "probs-causal-gqa4x2-s200": (1, 4, 2, 200, 64, "probs", True),
    "logits-causal-gqa4x2-s77-batch2": (2, 4, 2, 77, 64, "logits", True),
    "probs-full-gqa2x1-s77": (1, 2, 1, 77, 64, "probs", False),
    "logits-full-s50-d32": (1, 2, 2, 50, 32, "logits", False),
    "probs-causal-s40-d128": (1, 2, 1, 40, 128, "probs", True),
    "logits-causal-s33-d256": (1, 1, 1, 33, 256, "logits", True),
    "probs-causal-s20-d8-padded": (1, 2, 1, 20, 8, "probs", True),
}


@pytest.fixture(scope="module")
def results():
    """Per case: the inputs, the float32 Triton result and the float64 eager reference (computed on demand)."""
    cache = {}

    def get(name):
        if name not in cache:
            b, hq, hkv, s, d, target, causal = CASES[name]
            inputs = make_inputs(b, hq, hkv, s, d)
            kwargs = dict(softmax_scale=d ** -0.5, target=target, causal=causal)
            cache[name] = (inputs, kwargs, run(triton_attention, *inputs, torch.float32, **kwargs),
                           run(eager_attention, *inputs, torch.float64, **kwargs))
        return cache[name]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_triton_float32_matches_float64_eager(results, case):
    _, _, got, ref = results(case)
    b, hq, _, s, _, _, _ = CASES[case]
    assert got[1].shape == (b, hq, s)
    assert_close_all(got, ref, 1e-5)


def test_triton_bfloat16_matches_float32_within_bf16_rounding(results):
    """bf16 inputs (fp32 accumulation) against the fp32 kernel on the same values (the bf16-rounded ones)."""
    inputs, kwargs, _, _ = results("logits-causal-gqa4x2-s77-batch2")
    rounded = [t.to(torch.bfloat16).double() for t in inputs[:3]] + inputs[3:]
    got = run(triton_attention, *rounded, torch.bfloat16, **kwargs)
    assert got[0].dtype == torch.float64 and all(t.isfinite().all() for t in got)
    fp32 = run(triton_attention, *rounded, torch.float32, **kwargs)
    errors = assert_close_all(got, fp32, 2e-2)
    assert max(errors.values()) > 1e-5  # it really ran in bf16 (p and dS rounded), not in fp32
    # the probs target, on the inputs of another case
    inputs, kwargs, _, _ = results("probs-full-gqa2x1-s77")
    rounded = [t.to(torch.bfloat16).double() for t in inputs[:3]] + inputs[3:]
    assert_close_all(run(triton_attention, *rounded, torch.bfloat16, **kwargs),
                     run(triton_attention, *rounded, torch.float32, **kwargs), 2e-2)


def test_triton_without_penalty_matches_eager(results):
    """compute_penalty=False: no penalty, and output and gradients as eager without the penalty term."""
    inputs, kwargs, _, _ = results("probs-causal-gqa4x2-s200")
    q, k, v, grad_out = (t[:, :, :77] for t in inputs[:4])
    got = run(triton_attention, q, k, v, grad_out, None, torch.float32, compute_penalty=False, **kwargs)
    ref = run(eager_attention, q, k, v, grad_out, None, torch.float64, compute_penalty=False, **kwargs)
    assert got[1] is None and ref[1] is None
    assert_close_all(got, ref, 1e-5)


def test_triton_penalty_only_gradient_and_single_row():
    """Only the penalty reaches the loss (no gradient of the output), and a one-token sequence (no NaN)."""
    for s, target in ((40, "probs"), (1, "logits")):
        q, k, v, _, grad_penalty = make_inputs(1, 2, 1, s, 16, seed=3)
        kwargs = dict(softmax_scale=0.25, target=target)
        got = run(triton_attention, q, k, v, None, grad_penalty, torch.float32, **kwargs)
        ref = run(eager_attention, q, k, v, None, grad_penalty, torch.float64, **kwargs)
        for g, r in zip(got[:2], ref[:2]):
            assert rel_err(g, r) <= 1e-5
        for g, r in zip(got[2:], ref[2:]):  # zero gradients at s = 1 (probs: c = 1 whatever the scores)
            assert torch.isfinite(g).all() and (g - r).abs().max() <= 1e-5 * max(r.abs().max().item(), 1.0)


def test_triton_saves_nothing_quadratic():
    """The autograd graph keeps only O(s) tensors: inputs, output, log-sum-exp, collision term."""
    q, k, v, _, _ = make_inputs(1, 2, 1, 96, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out, penalty = triton_attention(*(t.float().requires_grad_() for t in (q, k, v)), 0.25)
    assert saved and max(torch.Size(s).numel() for s in saved) <= 96 * 16 * 2
    assert out.shape == (1, 2, 96, 16) and penalty.shape == (1, 2, 96)


def test_triton_supported_reasons():
    x = torch.zeros(1, 4, 8, 64, device=DEVICE)
    kv = torch.zeros(1, 2, 8, 64, device=DEVICE)
    assert triton_attention_supported(x, kv, kv) == (True, "supported")
    cases = {
        "power of two": (torch.zeros(1, 4, 8, 48, device=DEVICE), torch.zeros(1, 2, 8, 48, device=DEVICE)),
        "<= 256": (torch.zeros(1, 1, 2, 512, device=DEVICE), torch.zeros(1, 1, 2, 512, device=DEVICE)),
        "float64": (x.double(), kv.double()),
        "hq % hkv": (x, torch.zeros(1, 3, 8, 64, device=DEVICE)),
        "expected q [b, hq, s, d]": (x[0], kv),
        "empty": (x[:, :, :0], kv[:, :, :0]),
        "must share": (x, kv.half()),
    }
    for words, (q, k) in cases.items():
        ok, reason = triton_attention_supported(q, k)
        assert not ok and words in reason, (words, reason)
    wrong_device = torch.zeros(1, 4, 8, 64, device="meta" if DEVICE == "cpu" else "cpu")
    ok, reason = triton_attention_supported(wrong_device, wrong_device[:, :2])
    assert not ok and ("CPU tensors only" if DEVICE == "cpu" else "need CUDA tensors") in reason, reason
    q48, k48 = cases["power of two"]
    with pytest.raises(ValueError, match="power of two"):
        triton_attention(q48, k48, k48, 0.1)
    with pytest.raises(ValueError, match="target='entropy'"):
        triton_attention(x, kv, kv, 0.1, target="entropy")


# ----------------------------------------------------------------------------------------------------------
# GPU only: training-sized shapes against eager and blockwise

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (the interpreter is too slow for these shapes)")


@cuda_only
@pytest.mark.parametrize("target", ["probs", "logits"])
def test_triton_cuda_bf16_s1024_d128_matches_eager_and_blockwise(target):
    inputs = make_inputs(2, 8, 2, 1024, 128, seed=1)
    kwargs = dict(softmax_scale=128 ** -0.5, target=target)
    rounded = [t.to(torch.bfloat16).double() for t in inputs[:3]] + inputs[3:]
    got = run(triton_attention, *rounded, torch.bfloat16, **kwargs)
    ref = run(eager_attention, *rounded, torch.float64, **kwargs)
    blockwise = run(blockwise_attention, *rounded, torch.bfloat16, **kwargs)
    assert_close_all(got, ref, 2e-2)
    assert_close_all(got, blockwise, 2e-2)
    assert_close_all(run(triton_attention, *rounded, torch.float32, **kwargs), ref, 1e-5)


# ----------------------------------------------------------------------------------------------------------
# key slices with query/key offsets (context parallelism), merged through their statistics


@pytest.mark.parametrize("target,compute_penalty", [("probs", True), ("logits", True), ("probs", False)])
def test_triton_partials_with_offsets_merge_to_whole_attention(target, compute_penalty):
    """Queries [40, 117) of 150 against slices before them, their own positions (the diagonal: the kernels
    without offsets), after their diagonal (rows that see nothing of it) and past them (nobody sees it): full
    and masked tiles of every kernel, GQA, head dim 8 (padded)."""
    from fpa_megatron.attention.triton_attention import triton_attention_partial, triton_attention_partial_backward
    from tests.parallel.test_context_attention import check_key_slices

    check_key_slices(triton_attention_partial, triton_attention_partial_backward, 150, (40, 117),
                     [0, 37, 40, 117, 130, 150], target, compute_penalty, device=DEVICE)
