"""An explicit attention mask under context parallelism: CP2 follows the one-process run.

Our datasets never make a mask (the causal one is implied), but `forward_backward` takes batches with a bool
[b, 1, s, s] `attention_mask` (True = masked). Under CP2 its query rows are split with the batch and the eager
kernel applies each chunk's rows against the gathered keys. Real gloo ranks, a GQA GPT with two documents per
sequence (no attention across the boundary): LM loss, penalty, [L, H] record, every gradient (averaged over CP,
as DeepSpeed applies it) and the attention diagnostics within 1e-5 of one process, for both penalty targets.
"""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.testing import run_distributed

SEQ, MICRO, NUM_MICRO, VOCAB = 12, 2, 2, 64
TARGETS = ("probs", "logits")


def _batches(with_mask: bool = True) -> list[dict]:
    """Two micro-batches; each sequence holds two documents (positions 0-4 and 5-11) that do not see each other."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=g)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] != doc[None, :])[None, None].expand(MICRO, 1, SEQ, SEQ).contiguous()
    out = []
    for t in tokens.split(MICRO):
        batch = dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(MICRO, SEQ),
                     position_ids=torch.arange(SEQ).expand(MICRO, SEQ).contiguous())
        out.append(dict(batch, attention_mask=mask) if with_mask else batch)
    return out


def _step(cp: int, target: str, with_mask: bool = True) -> dict:
    """One forward-backward (lambda 0.1) and one measured no-grad micro-batch of a fresh model under CP `cp`."""
    from megatron.core import parallel_state

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import gather_global
    from fpa_megatron.training.forward_backward import forward_backward

    cfg = config_from_dict({}, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        f"model.seq_length={SEQ}", f"model.vocab_size={VOCAB}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO * NUM_MICRO}", "data.mock=true", f"parallel.context={cp}",
        f"fpa.target={target}"])
    layout = check_config(cfg, cp)
    init_model_parallel(1, 1, seed=0, context=cp)
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, seed=1)
    penalty.set_step(0.1, True)
    kwargs = dict(micro_batch_size=MICRO, seq_length=SEQ)
    result = forward_backward(model, iter(_batches(with_mask)), penalty, num_microbatches=NUM_MICRO, **kwargs)
    grads = {}
    for name, param in model.named_parameters():  # the mean over CP: what DeepSpeed's DP x CP average applies
        grad = param.grad.detach().clone()
        if cp > 1:
            torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        grads[name] = grad / cp
    paths = dict(penalty.path_calls)
    penalty.stats.reset()
    penalty.stats.measuring = True
    with torch.no_grad():
        forward_backward(model, iter(_batches(with_mask)[:1]), penalty, num_microbatches=1, forward_only=True,
                         **kwargs)
    penalty.stats.measuring = False
    return dict(loss=result.lm_loss, matrix=result.penalty_matrix, paths=paths, stats=penalty.stats.reduce(),
                grads=gather_global(model, grads))


def single_rank(_) -> dict:
    return {target: _step(1, target) for target in TARGETS} | {"causal": _step(1, "probs", with_mask=False)}


def cp2_rank(_) -> dict:
    from fpa_megatron.parallel.context import split_batch_for_context_parallel

    out = {target: _step(2, target) for target in TARGETS}
    flat = dict(_batches()[0], attention_mask=torch.zeros(MICRO, SEQ, SEQ, dtype=torch.bool))  # no head dim
    try:
        split_batch_for_context_parallel(flat)
    except ValueError as err:
        out["bad_shape"] = str(err)
    return out


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()  # NaN never equals NaN
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def runs():
    return run_distributed(single_rank, 1, None)[0], run_distributed(cp2_rank, 2, None)


@pytest.mark.parametrize("target", TARGETS)
def test_cp2_with_document_mask_equals_one_process(runs, target):
    single, cp2 = runs
    want = single[target]
    assert want["paths"] == {"eager": NUM_MICRO * 2}  # `auto` takes the eager kernel for an explicit mask
    for got in cp2:
        mine = got[target]
        assert mine["paths"] == want["paths"]
        assert _rel(mine["loss"], want["loss"]) <= 1e-5
        assert want["matrix"].gt(0).all() and _rel(mine["matrix"], want["matrix"]) <= 1e-5
        assert set(mine["grads"]) == set(want["grads"]) and want["grads"]
        for name, grad in want["grads"].items():
            assert _rel(mine["grads"][name], grad) <= 1e-5, name
        for key, value in want["stats"].items():
            assert _rel(mine["stats"][key], value) <= 1e-5, key
    # the mask matters: without it the same model and tokens give another loss, penalty and collision
    causal = single["causal"]
    assert abs(causal["loss"] - single["probs"]["loss"]) > 1e-3
    assert _rel(causal["matrix"], single["probs"]["matrix"]) > 1e-2
    assert _rel(causal["stats"]["collision"], single["probs"]["stats"]["collision"]) > 1e-2


def test_cp2_rejects_a_mask_without_the_head_dimension(runs):
    for got in runs[1]:
        assert "attention_mask of shape (2, 12, 12)" in got["bad_shape"]
        assert "[b, 1, s, s] with s = 12" in got["bad_shape"]
