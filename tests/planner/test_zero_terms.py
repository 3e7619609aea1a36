"""The planner's ZeRO terms against the optimizer state DeepSpeed 0.19 actually holds (2 ranks, DP2, ZeRO-1/2).

The engine is built as training/optimizer.py builds it (torch AdamW under DeepSpeed ZeRO), one step is taken,
and the bytes of its fp32 partitions (master weights, their gradient) and of Adam's moments are summed per rank.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fpa_megatron.config import config_from_dict
from fpa_megatron.model.memory import Layout, optimizer_bytes, stage_parameters
from fpa_megatron.testing import run_distributed

VOCAB = 256


def tiny_config(zero_stage: int, dtype: str):
    return config_from_dict(dict(
        model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=VOCAB, dtype=dtype),
        optimizer=dict(zero_stage=zero_stage), train=dict(micro_batch_size=1, global_batch_size=2)))


COMBOS = [(stage, dtype) for stage in (1, 2) for dtype in ("fp32", "bf16")]


def zero_ranks():
    """Every (ZeRO stage, dtype) in one spawn: DeepSpeed's start-up is the slow part."""
    return {combo: zero_rank(*combo) for combo in COMBOS}


@functools.cache
def measured():
    return run_distributed(zero_ranks, 2, timeout_s=600)


def zero_rank(zero_stage: int, dtype: str):
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.training.optimizer import build_engine, optimizer_step

    cfg = tiny_config(zero_stage, dtype)
    init_model_parallel(1, 1, seed=0)
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, VOCAB, penalty, seed=5)
    engine = build_engine(model, cfg.optimizer, dtype, 1, 1)
    seq = cfg.model.seq_length
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=generator)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, seq),
                 position_ids=torch.arange(seq).expand(1, seq))
    forward_backward(model, iter([batch]), penalty, num_microbatches=1, micro_batch_size=1, seq_length=seq,
                     engine=engine)
    optimizer_step(engine, 1e-3)
    opt = engine.optimizer
    masters = opt.single_partition_of_fp32_groups
    moments = [v for m in masters for v in opt.optimizer.state[m].values() if torch.is_tensor(v) and v.numel() > 1]

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    return dict(params=sum(p.numel() for p in model.parameters()), master=nbytes(masters), moments=nbytes(moments),
                master_dtypes={str(m.dtype) for m in masters},
                param_dtypes={str(p.dtype) for p in model.parameters()})


@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_terms_match_deepspeed(zero_stage, dtype):
    cfg = tiny_config(zero_stage, dtype)
    layout = Layout(data=2, zero_stage=zero_stage)
    params = stage_parameters(cfg, layout, VOCAB, 0)
    terms = optimizer_bytes(params, layout, dtype)
    for rank in (ranks[(zero_stage, dtype)] for ranks in measured()):
        assert rank["params"] == params
        assert rank["master_dtypes"] == {"torch.float32"}  # fp32 master partition even for a bf16 model
        assert rank["param_dtypes"] == {"torch.float32" if dtype == "fp32" else "torch.bfloat16"}
        # DeepSpeed pads each partition to an alignment: within 1 %
        assert abs(rank["master"] / terms["master_fp32"] - 1) < 0.01, (rank, terms)
        assert abs(rank["moments"] / terms["adam_moments"] - 1) < 0.01, (rank, terms)
