"""Attention over one part of the keys, and the exact merge of such parts (context parallelism's arithmetic).

A partial over a key set K holds, per query row, the output normalized over K, lse2 = log2 sum_{j in K} 2^(t_ij)
(t = s * log2 e: the kernels work in base 2) and the penalty's statistic: probs: log2 sum_{j in K} 2^(2 t_ij)
(then c = 2^(stat - 2 lse2)); logits: sum_{j in K} s_ij^2. LSEs merge by logaddexp2, sums add. The backward of
every partial, given the merged LSE and D'_i = rowsum(dO_i * O_i) + 2 g_i c_i, is exact: dS = p (dP + 2 g p - D'),
the p normalized over all keys (docs/fpa_math.md section 6).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

LOG2E = math.log2(math.e)  # natural -> base-2 units: exp(x) = 2^(x * LOG2E)


class Partial(NamedTuple):
    """Attention of some query rows over one key set: out [..., s, d] normalized over that set, lse2 [..., s]
    (base-2 LSE of the scores; -inf for a row that sees none of the keys), stat [..., s] or None (probs: base-2
    LSE of twice the scores; logits: sum of the squared visible scores)."""

    out: Tensor
    lse2: Tensor
    stat: Optional[Tensor]


def merge_partials(partials: Sequence[Partial], target: Optional[str]) -> Partial:
    """The partial over the union of the (disjoint) key sets: LSEs by logaddexp2, outputs weighted by
    2^(lse2_k - lse2), the probs statistic by logaddexp2, the logits one summed. target None: no statistic."""
    lse2 = functools.reduce(torch.logaddexp2, [p.lse2 for p in partials])
    ref = lse2.masked_fill(lse2 == float("-inf"), 0.0)  # a row that sees no key at all stays 0
    out = sum(p.out * torch.exp2(p.lse2 - ref).to(p.out.dtype).unsqueeze(-1) for p in partials)
    stat = None
    if target == "probs":
        stat = functools.reduce(torch.logaddexp2, [p.stat for p in partials])
    elif target == "logits":
        stat = sum(p.stat for p in partials)
    return Partial(out, lse2, stat)


def row_penalty(merged: Partial, target: str) -> Tensor:
    """Each row's penalty from merged statistics: probs c = 2^(stat - 2 lse2) = sum_j p_ij^2; logits the sum."""
    return torch.exp2(merged.stat - 2.0 * merged.lse2) if target == "probs" else merged.stat


def score_grad_shift(out: Tensor, grad_out: Tensor, collision: Optional[Tensor],
                     grad_penalty: Optional[Tensor]) -> Tensor:
    """D'_i = rowsum(dO_i * O_i) (+ 2 g_i c_i for the probs penalty), [..., s] float32 (float64 for float64):
    with the merged O and c, the shift of every partial's dS = p (dP + 2 g p - D')."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = torch.linalg.vecdot(grad_out.to(acc), out.to(acc))
    if collision is not None and grad_penalty is not None:
        delta = delta.addcmul_(grad_penalty.to(acc), collision.to(acc), value=2.0)
    return delta
