"""The reference attention: explicit [b, h, s, s] scores (`eager_attention`), and torch's fused SDPA for the calls
that need no penalty (`sdpa_attention`). Every other kernel is tested against `eager_attention`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fpa_megatron.options import FPA_TARGETS, require_one_of


class SoftmaxWithCollision(torch.autograd.Function):
    """p = softmax(s) along the last dim and c = sum_j p_j^2, with one fused backward.

    The gradient of c with respect to p is 2 p, so the penalty folds into the softmax backward as
    dP += 2 g p: dS = p (dP + 2 g p - D - 2 g c), the formula of docs/fpa_math.md section 2, with no extra
    [b, h, s, s] temporaries beyond one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, scores: Tensor):
        probs = torch.softmax(scores, dim=-1)
        # sum_j p_ij^2 as a squared norm: one fused reduction pass, the fastest of the forms we measured
        collision = torch.linalg.vector_norm(probs, dim=-1).square()  # [b, h, s]
        ctx.save_for_backward(probs)
        return probs, collision

    @staticmethod
    def backward(ctx, grad_probs: Tensor, grad_collision: Tensor):
        (probs,) = ctx.saved_tensors
        if grad_probs is None:
            grad_probs = torch.zeros_like(probs)
        if grad_collision is not None:
            # dP + 2 g P, in place: the incoming gradient buffer is this node's alone (one consumer of probs)
            grad_probs = grad_probs.addcmul_(probs, (2.0 * grad_collision).unsqueeze(-1))
        return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def causal_mask(sq: int, sk: int, device) -> Tensor:
    """[sq, sk] bool, True where key j is in the future of query i (masked)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1 + sk - sq)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *, target: str = "probs",
                    compute_penalty: bool = True, causal: bool = True, attention_mask: Optional[Tensor] = None,
                    dropout=None) -> tuple[Tensor, Optional[Tensor]]:
    """Attention (causal by default) with its per-row penalty, materializing the [b, h, s, s] scores.

    q: [b, hq, s, d]; k, v: [b, hkv, s, d] (GQA: hq % hkv == 0). attention_mask: optional bool, True = masked,
    broadcastable to [b, hq, s, s]. Returns (out [b, hq, s, d], row_penalty [b, hq, s] float32 or None):
    probs: sum_j p_ij^2 (before dropout); logits: sum over unmasked j of s_ij^2.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    require_one_of("target", target, FPA_TARGETS)
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale  # [b, h, sq, sk]
    if causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    else:
        mask = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        mask = mask | attention_mask
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scores.to(acc_dtype).masked_fill(mask, float("-inf"))
    row_penalty = None
    if compute_penalty and target == "probs":
        probs, row_penalty = SoftmaxWithCollision.apply(scores)
    else:
        probs = torch.softmax(scores, dim=-1)
        if compute_penalty:  # logits: the masked entries are excluded
            unmasked = scores.masked_fill(mask, 0.0)
            row_penalty = torch.linalg.vector_norm(unmasked, dim=-1).square()
    probs = probs.to(q.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs, v), row_penalty


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Causal attention without the penalty through torch's fused kernels (FlashAttention or memory-efficient
    attention on CUDA, a flash-style kernel on CPU); GQA reads the shared K/V heads without repeating them."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
