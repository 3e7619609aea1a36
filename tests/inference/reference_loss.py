"""The independent reference of a loss over a token stream: transformers' model in float64 log-probabilities,
windows of `seq` inputs sharing one token (how fpa-eval cuts a stream)."""

from __future__ import annotations

import torch


def stream_loss_sum(model, tokens: list[int], seq: int) -> float:
    """The summed negative log-likelihood of tokens[1:] given what comes before, window by window."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, seq):
            window = torch.tensor(tokens[start:start + seq + 1])
            logp = torch.log_softmax(model(window[None, :-1]).logits.double()[0], dim=-1)
            total -= float(logp.gather(1, window[1:, None]).sum())
    return total
