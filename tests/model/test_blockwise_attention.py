"""The blockwise (tiled, O(S) memory) attention against the eager path and an explicit float64 softmax.

Outputs, the per-row penalty and the gradients (with an arbitrary upstream gradient of the penalty, as the
caller reduces it in ordinary autograd) must agree for both targets, causal and not, GQA, lengths that are
not a multiple of the block size, float64 / float32 / bfloat16; `gradcheck` on small shapes; and the kernel
must skip fully masked tiles and save nothing of size [s, s].
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fpa_megatron.attention.blockwise import blockwise_attention
from fpa_megatron.attention.reference import eager_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(q, k, v, scale, target, causal=True):
    """Explicit float64 softmax attention in plain autograd ops: (out [b,h,s,d], row_penalty [b,h,s])."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = scale * q @ k.transpose(-1, -2)  # [b, h, s, s]
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1) if causal else None
    masked = scores.masked_fill(mask, float("-inf")) if causal else scores
    probs = torch.softmax(masked, dim=-1)
    if target == "probs":
        penalty = (probs * probs).sum(-1)
    else:
        unmasked = scores.masked_fill(mask, 0.0) if causal else scores
        penalty = (unmasked * unmasked).sum(-1)
    return probs @ v, penalty


def make_inputs(b=2, hq=4, hkv=2, s=37, d=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    grad_pen = torch.randn(b, hq, s, generator=g, dtype=torch.float64)  # arbitrary upstream gradient
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    return leaves, grad_out.to(device=device, dtype=dtype), grad_pen.to(device)


def run(fn, leaves, grad_out, grad_pen, **kwargs):
    """Forward, then backward of sum(out * grad_out) + sum(penalty * grad_pen): (out, penalty, dq, dk, dv)."""
    out, pen = fn(*leaves, **kwargs)
    loss = (out.float() * grad_out.float()).sum() if out.dtype == torch.bfloat16 else (out * grad_out).sum()
    if pen is not None:
        loss = loss + (pen * grad_pen.to(pen.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out, pen) + tuple(grads)


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


NAMES = ("out", "penalty", "dq", "dk", "dv")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["probs", "logits"])
@pytest.mark.parametrize("causal", [True, False])
# key tiles: square (= block), several blocks wide (40 rounds down to 32), one tile for the whole sequence
@pytest.mark.parametrize("hq,hkv,s,block,key_block", [(4, 2, 37, 16, 40), (2, 2, 64, 16, 16), (3, 1, 20, 7, 1024),
                                                      (2, 1, 9, 1, 3), (2, 2, 13, 64, 1024)])
def test_float64_matches_explicit_softmax(device, target, causal, hq, hkv, s, block, key_block):
    leaves, grad_out, grad_pen = make_inputs(hq=hq, hkv=hkv, s=s, device=device)
    scale = 1 / math.sqrt(8)
    got = run(blockwise_attention, leaves, grad_out, grad_pen, softmax_scale=scale, target=target,
              block_size=block, causal=causal, key_block_size=key_block)
    ref = run(reference, leaves, grad_out, grad_pen, scale=scale, target=target, causal=causal)
    eager = run(eager_attention, leaves, grad_out, grad_pen, softmax_scale=scale, target=target, causal=causal)
    assert got[1].dtype == torch.float64 and got[1].shape == (2, hq, s)
    for name, a, b, e in zip(NAMES, got, ref, eager):
        assert rel_err(a, b) <= 1e-10, (name, rel_err(a, b))
        assert rel_err(e, b) <= 1e-10, ("eager " + name, rel_err(e, b))


@pytest.mark.parametrize("target", ["probs", "logits"])
@pytest.mark.parametrize("hq,hkv,s,block,key_block", [(4, 2, 11, 4, 4), (2, 2, 8, 3, 1024)])
def test_gradcheck(target, hq, hkv, s, block, key_block):
    leaves, _, _ = make_inputs(b=1, hq=hq, hkv=hkv, s=s, d=4)

    def fn(q, k, v):
        return blockwise_attention(q, k, v, 0.7, target=target, block_size=block, key_block_size=key_block)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_float32_matches_eager(target):
    leaves, grad_out, grad_pen = make_inputs(b=2, hq=4, hkv=2, s=300, d=32, dtype=torch.float32)
    scale = 1 / math.sqrt(32)
    got = run(blockwise_attention, leaves, grad_out, grad_pen, softmax_scale=scale, target=target, block_size=64,
              key_block_size=128)
    eager = run(eager_attention, leaves, grad_out, grad_pen, softmax_scale=scale, target=target)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b in zip(NAMES, got, eager):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_bfloat16_accumulates_in_float32(target):
    leaves, grad_out, grad_pen = make_inputs(b=1, hq=4, hkv=2, s=150, d=16, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(16)
    got = run(blockwise_attention, leaves, grad_out, grad_pen, softmax_scale=scale, target=target, block_size=32)
    # Reference: the same bf16-rounded values, in float64.
    ref = run(reference, [t.detach().double().requires_grad_() for t in leaves], grad_out.double(), grad_pen,
              scale=scale, target=target)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2:])
    for name, a, b in zip(NAMES, got, ref):
        assert rel_err(a, b) <= 2e-2, (name, rel_err(a, b))


def test_penalty_off_returns_none_and_the_same_attention():
    leaves, grad_out, grad_pen = make_inputs()
    on = run(blockwise_attention, leaves, grad_out, torch.zeros_like(grad_pen), softmax_scale=0.4, block_size=16)
    off = run(blockwise_attention, leaves, grad_out, grad_pen, softmax_scale=0.4, block_size=16,
              compute_penalty=False)
    assert off[1] is None
    for name, a, b in zip(NAMES, on, off):
        if name != "penalty":
            assert rel_err(a, b) <= 1e-12, name


@pytest.mark.parametrize("target", ["probs", "logits"])
def test_gradient_through_one_output_only(target):
    """Only the penalty, or only the output, reaches the loss (the other gradient arrives as None)."""
    (q, k, v), _, _ = make_inputs(s=21)
    for pick in (0, 1):
        got = torch.autograd.grad(blockwise_attention(q, k, v, 0.5, target=target, block_size=8)[pick].sum(), (q, k, v))
        ref = torch.autograd.grad(reference(q, k, v, 0.5, target)[pick].sum(), (q, k, v), allow_unused=True)
        for a, b in zip(got, ref):
            if b is None:  # the penalty does not depend on v
                assert a is None or not a.any()
            else:
                assert rel_err(a, b) <= 1e-10


def test_non_contiguous_inputs_and_no_grad():
    """The core attention passes permuted views ([s, b, h, d] -> [b, h, s, d]); inference needs no graph."""
    (q, k, v), grad_out, grad_pen = make_inputs(b=2, hq=4, hkv=4, s=19)
    qp, kp, vp = (t.detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
    assert not qp.is_contiguous()
    got = run(blockwise_attention, [qp, kp, vp], grad_out, grad_pen, softmax_scale=0.3, block_size=8)
    ref = run(reference, [qp, kp, vp], grad_out, grad_pen, scale=0.3, target="probs")
    for name, a, b in zip(NAMES, got, ref):
        assert rel_err(a, b) <= 1e-10, name
    with torch.no_grad():
        out, pen = blockwise_attention(q, k, v, 0.3, block_size=8)
    assert out.grad_fn is None and rel_err(out, got[0]) <= 1e-12


class _CountBmm(TorchDispatchMode):
    """Counts the batched matmuls (one per tile and product), forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("key_block", [16, 1024])
def test_skips_masked_tiles_and_saves_no_square_tensor(key_block):
    """Causal: only the tiles on or below the diagonal are computed (square tiles: nb (nb + 1) / 2 of them;
    one key tile per query block when it is wider than the sequence); saved state is O(s)."""
    (q, k, v), _, _ = make_inputs(b=1, hq=4, hkv=2, s=50, d=8)
    nb = math.ceil(50 / 16)  # 4 blocks, the last one short
    expected = {16: ((True, nb * (nb + 1) // 2), (False, nb * nb)), 1024: ((True, nb), (False, nb))}
    for causal, tiles in expected[key_block]:
        counter = _CountBmm()
        with counter:
            out, pen = blockwise_attention(q, k, v, 0.3, block_size=16, causal=causal, key_block_size=key_block)
        assert counter.calls == 2 * tiles  # QK^T and PV per tile
        saved = [t for t in out.grad_fn.saved_tensors if t is not None]
        assert max(t.numel() for t in saved) == q.numel()  # inputs, output, lse, collision: nothing [s, s]
        counter = _CountBmm()
        with counter:
            (out.sum() + pen.sum()).backward()
        assert counter.calls == 5 * tiles  # QK^T, dO V^T, P^T dO, dS K, dS^T Q


def test_rejects_bad_arguments():
    (q, k, v), _, _ = make_inputs(hq=3, hkv=2)
    with pytest.raises(ValueError, match="hq % hkv"):
        blockwise_attention(q, k, v, 1.0)
    (q, k, v), _, _ = make_inputs()
    with pytest.raises(ValueError, match="target"):
        blockwise_attention(q, k, v, 1.0, target="entropy")
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(q, k, v, 1.0, block_size=0)
    with pytest.raises(ValueError, match="key_block_size=0"):
        blockwise_attention(q, k, v, 1.0, key_block_size=0)
