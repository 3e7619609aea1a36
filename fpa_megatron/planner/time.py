"""Estimated time of one optimizer step for a layout: compute at a stated MFU, the pipeline bubble, and the
TP / CP / PP / DP communication volumes over stated link bandwidths, counted without overlap (an upper bound
for the communication that Megatron and DeepSpeed partly hide behind compute)."""

from __future__ import annotations

from dataclasses import dataclass

from fpa_megatron.config import RunConfig
from fpa_megatron.flops import flops_per_token
from fpa_megatron.model.memory import BYTES, Layout


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    tflops: float = 989.0  # dense bf16 peak per GPU (H100/H200 SXM)
    mfu: float = 0.40  # achievable fraction of the peak for the model's FLOPs (Megatron-LM reports 0.4-0.55)
    intra_gbps: float = 3600.0  # per-GPU link inside a node, Gbit/s (NVLink 4: 450 GB/s)
    inter_gbps: float = 400.0  # per-GPU link between nodes, Gbit/s (one 400G NIC per GPU)


def _ring(volume_bytes: float, group: int) -> float:
    """Bytes each rank sends in a ring all-reduce of volume_bytes over `group` ranks (2 (n-1)/n of it)."""
    return 0.0 if group <= 1 else 2 * (group - 1) / group * volume_bytes


def _link_bytes_per_s(hw: Hardware, span: int) -> float:
    """Bandwidth of a group that spans `span` consecutive ranks: intra-node if it fits in one node."""
    return (hw.intra_gbps if span <= hw.gpus_per_node else hw.inter_gbps) * 1e9 / 8


def step_time(cfg: RunConfig, layout: Layout, padded_vocab: int, params_per_gpu: int, hw: Hardware) -> dict:
    """Seconds per optimizer step, each term shown. Ranks are ordered TP, CP, DP, PP (Megatron's order)."""
    m = cfg.model
    e = BYTES[m.dtype]
    t, p, v, cp, dp = layout.tensor, layout.pipeline, layout.virtual_pipeline, layout.context, layout.data
    tokens = cfg.train.global_batch_size * m.seq_length
    per_token = flops_per_token(m, padded_vocab, causal=True)
    recompute_factor = {"none": 1.0, "selective": 1.0, "full": 4.0 / 3.0}[layout.recompute]  # one more forward
    flops = tokens * per_token * recompute_factor / layout.gpus
    compute = flops / (hw.tflops * 1e12 * hw.mfu)
    bubble = compute * (p - 1) / (layout.num_microbatches * v)

    layers_here = m.num_layers // p
    sb = m.seq_length // cp * layout.micro_batch_size
    mb = layout.num_microbatches
    passes = 3 if layout.recompute == "full" else 2  # forward (+ its recompute) and backward
    # TP: 2 all-reduces (or all-gather + reduce-scatter with SP: the same volume) of [s, b, h] per layer and pass
    tp_bytes = layers_here * mb * passes * 2 * _ring(sb * m.hidden_size * e, t)
    tp = tp_bytes / _link_bytes_per_s(hw, t)
    # CP: each rank receives the other ranks' K and V per layer in forward, and sends dK, dV back in backward
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    kv_bytes = sb * 2 * groups * (m.hidden_size // heads) // t * e
    cp_comm = layers_here * mb * passes * (cp - 1) * kv_bytes / _link_bytes_per_s(hw, t * cp) if cp > 1 else 0.0
    # PP: one activation forward and one gradient backward per micro-batch and stage boundary (x v chunks)
    pp_comm = (2 * mb * v * sb * m.hidden_size // (t if layout.sequence_parallel else 1) * e
               / _link_bytes_per_s(hw, t * cp * dp * p)) if p > 1 else 0.0
    # DP (x CP): ZeRO reduce-scatters the gradients and all-gathers the updated weights: one all-reduce's volume
    dp_comm = _ring(params_per_gpu * e, dp * cp) / _link_bytes_per_s(hw, t * cp * dp)
    total = compute + bubble + tp + cp_comm + pp_comm + dp_comm
    return {"compute_s": compute, "bubble_s": bubble, "tp_comm_s": tp, "cp_comm_s": cp_comm, "pp_comm_s": pp_comm,
            "dp_comm_s": dp_comm, "step_s": total, "flops_per_gpu": flops,
            "tokens_per_s": tokens / total, "mfu_estimate": flops / total / (hw.tflops * 1e12)}
