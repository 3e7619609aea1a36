"""The norms of our layer spec: torch's LayerNorm / RMSNorm, usable with sequence parallelism.

Without Apex, Megatron's local spec builds `WrappedTorchNorm`, which refuses `config.sequence_parallel`
although a norm needs nothing from SP: under SP it normalizes this rank's slice of the sequence, row by row.
What SP does change is the gradient of the norm's weight and bias: each tensor-parallel rank holds only its
slice's share, so the parameters are marked `sequence_parallel = True` (Megatron's attribute) and their
gradients are summed over the TP group after backward (`training/forward_backward.py`).
"""

from __future__ import annotations

import torch

NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelNorm:
    """Build torch's norm for `config.normalization`, its parameters marked `sequence_parallel` when the
    norm sees this rank's slice of the sequence (`for_qk`: the per-head query/key norms see the whole one).

    A factory like Megatron's `WrappedTorchNorm` (same arguments), so the module, its parameter names and
    its numerics are torch's own.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm", for_qk: bool = False):
        if config.normalization not in NORMS:
            raise ValueError(f"normalization={config.normalization!r}: our spec builds {sorted(NORMS)}")
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma, persist_layer_norm and memory_efficient_layer_norm need "
                             "Transformer Engine or Apex norms, not torch's")
        norm = NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel) and not for_qk
        return norm
