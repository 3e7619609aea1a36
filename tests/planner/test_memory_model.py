"""The planner's memory model against the live tensor bytes of real training steps (issue 17).

Tiny real models (2 layers per stage, hidden 64, 4 heads, vocabulary 256, micro-batch 1, fp32) built by the
project's own builder run one forward + backward on Megatron's schedule through `forward_backward`, with the
attention kernels a CPU run uses (blockwise with the penalty; eager where it materializes S x S). The peak of
live tensor bytes (`LiveTensorBytes`, every storage an op creates until torch frees it) plus the parameters
must be within 15 % of the planner's weights + gradients + activation peak, per rank (PP2: per stage).

The same for TP2 + sequence parallelism and CP2 (each rank's chunks of the sequence), and with document masking
(`data.document_mask`: 3 documents per sample, each longer than a CP chunk, as the planner assumes; the
blockwise kernel one sample at a time, eager's mask).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fpa_megatron.config import ConfigError, config_from_dict
from fpa_megatron.preflight import check_config
from fpa_megatron.model.memory import Layout, activation_peak, stage_parameters
from fpa_megatron.testing import run_distributed

VOCAB, LAYERS_PER_STAGE, TOLERANCE = 256, 2, 0.15
SEQS = (256, 1024, 2048)
RECOMPUTE = ("none", "selective", "full")
MICROBATCHES = 3  # more than PP2 keeps: with PP2 the first stage holds 2 in flight, not 3


def case_config(tp, pp, sp, cp, seq, recompute, impl, documents=False):
    return config_from_dict(dict(
        model=dict(num_layers=LAYERS_PER_STAGE * pp, hidden_size=64, num_attention_heads=4, seq_length=seq,
                   recompute=recompute, vocab_size=VOCAB, attention_impl=impl, dtype="fp32"),
        parallel=dict(tensor=tp, pipeline=pp, context=cp, sequence_parallel=sp),
        train=dict(micro_batch_size=1, global_batch_size=MICROBATCHES), data=dict(mock=True, document_mask=documents),
        checkpoint=dict(resume="none")))


# (tp, pp, sp, cp, seq, recompute, impl)
CASES = ([(1, 1, False, 1, s, r, "auto") for s in SEQS for r in RECOMPUTE]
         + [(2, 1, False, 1, s, r, "auto") for s in SEQS for r in RECOMPUTE]
         + [(2, 1, True, 1, s, r, "auto") for s in SEQS for r in RECOMPUTE]
         + [(1, 2, False, 1, s, r, "auto") for s in SEQS for r in RECOMPUTE]
         + [(1, 1, False, 2, s, "selective", "auto") for s in SEQS]
         + [(1, 1, False, 1, 1024, r, "eager") for r in RECOMPUTE] + [(2, 1, False, 1, 1024, "none", "eager")]
         + [(1, 1, False, 1, 2048, "none", "auto", True), (1, 1, False, 2, 2048, "selective", "auto", True),
            (1, 1, False, 1, 1024, "none", "eager", True)])
DOCUMENTS_PER_SAMPLE = 3  # documents longer than a CP chunk: the planner plans for documents that span chunks


def _world(case) -> int:  # case: (tp, pp, sp, cp, seq, recompute, impl[, documents])
    tp, pp, _, cp = case[:4]
    return tp * pp * cp


def _rejected(case):
    """The config_checks error for this layout on this branch, or None."""
    try:
        check_config(case_config(*case), _world(case))
    except ConfigError as err:
        return str(err)
    return None


def measure_rank(cases):
    """One forward + backward per case on this rank: (case, pipeline stage, parameter bytes, peak live bytes)."""
    from megatron.core import parallel_state

    from fpa_megatron.attention.documents import document_ids, document_positions
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.model.live_memory import LiveTensorBytes
    from fpa_megatron.training.forward_backward import forward_backward

    results = []
    for case in cases:
        cfg = case_config(*case)
        tp, pp, _, cp, seq = case[:5]
        init_model_parallel(tp, pp, seed=0, context=cp)
        penalty = make_penalty(cfg.model, cfg.fpa)
        # as the trainer builds it; forward_backward gives each CP rank its chunks of every micro-batch
        documents = cfg.data.document_mask
        model = build_gpt_model(cfg.model, VOCAB, penalty, seed=5, sequence_parallel=cfg.parallel.sequence_parallel,
                                document_positions=documents)
        penalty.set_step(0.5, True)
        tokens = torch.randint(0, VOCAB - 1, (MICROBATCHES, seq + 1), generator=torch.Generator().manual_seed(0))
        if documents:
            length = seq // DOCUMENTS_PER_SAMPLE
            tokens[:, length - 1::length] = VOCAB - 1  # EOD
        batches = []
        for t in tokens.split(1):
            batch = dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(), loss_mask=torch.ones(1, seq),
                         position_ids=torch.arange(seq).expand(1, seq))
            if documents:
                batch["document_ids"] = document_ids(batch["tokens"], VOCAB - 1)
                batch["position_ids"] = document_positions(batch["document_ids"])
            batches.append(batch)
        num_microbatches = MICROBATCHES if pp > 1 else 1
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with LiveTensorBytes() as live:
            forward_backward(model, iter(batches), penalty, num_microbatches=num_microbatches, micro_batch_size=1,
                             seq_length=seq)
        results.append((case, parallel_state.get_pipeline_model_parallel_rank(), param_bytes, live.peak))
    return results


@functools.cache
def measured(world: int) -> dict:
    """{case: [(stage, parameter bytes, peak bytes) per rank]} for every runnable case of this world size:
    one spawn per world size."""
    cases = [c for c in CASES if _world(c) == world and _rejected(c) is None]
    out: dict = {}
    for rank_results in run_distributed(measure_rank, world, cases, timeout_s=600):
        for case, stage, param_bytes, peak in rank_results:
            out.setdefault(case, []).append((stage, param_bytes, peak))
    return out


def _case_id(case):
    tp, pp, sp, cp, seq, recompute, impl = case[:7]
    return f"tp{tp}{'sp' if sp else ''}-pp{pp}-cp{cp}-s{seq}-{recompute}-{impl}{'-documents' if case[7:] else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_planner_memory_matches_a_measured_step(case):
    reason = _rejected(case)
    if reason is not None:
        pytest.fail(f"config_checks rejects this layout: {reason}")
    tp, pp, sp, cp, seq, recompute, impl = case[:7]
    cfg = case_config(*case)
    layout = Layout(tensor=tp, pipeline=pp, context=cp, sequence_parallel=sp, recompute=recompute,
                    micro_batch_size=1, num_microbatches=MICROBATCHES if pp > 1 else 1)
    for stage, param_bytes, peak in measured(_world(case))[case]:
        params = stage_parameters(cfg, layout, VOCAB, stage)
        assert params * 4 == param_bytes  # the planner's parameter count of this rank is exact
        predicted = 2 * params * 4 + activation_peak(cfg, layout, VOCAB, stage, device="cpu")["peak"]
        actual = param_bytes + peak
        assert abs(predicted / actual - 1) <= TOLERANCE, (stage, predicted, actual)


def test_live_tensor_bytes_counts_saved_tensors_and_frees():
    """The counter itself: a tensor saved for backward stays counted after its name is gone, until backward."""
    from fpa_megatron.model.live_memory import LiveTensorBytes

    x = torch.randn(1000, 1000, requires_grad=True)  # exists before: not counted
    with LiveTensorBytes() as live:
        y = x.exp()  # saved by exp's backward
        z = y.sum()
        del y
        assert live.live == 4_000_000 + 4  # y's storage and z
        view = x[:10]  # a view of a tensor from before the mode: not counted
        assert live.live == 4_000_000 + 4
        del view
        z.backward()
        del z
    assert live.live == 4_000_000  # x.grad, made inside the mode
    assert live.peak == 8_000_008  # y and its gradient (4 MB each), z and the scalar gradient of z
