"""z-loss (`optimizer.z_loss`): z_loss * the mean over unmasked tokens of (log Z)^2 of the output softmax.

- `vocab_parallel_log_z` over a vocabulary split on TP2 gives log Z and its gradient equal to a float64
  `logsumexp` of the whole rows;
- the model's z-loss through Megatron's schedule is the same on TP1, TP2 and CP2 (real gloo ranks), equals a float64
  reference computed here from the model's logits, leaves the LM loss as it is, and its gradients are the same on
  both layouts;
- a run logs it as `z_loss` and the TensorBoard tag `train/z_loss`.
"""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.testing import run_distributed

SEQ, MICRO, NUM_MICRO, VOCAB, REAL_VOCAB, WEIGHT = 16, 2, 2, 256, 200, 1e-2


def _batches():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, REAL_VOCAB, (NUM_MICRO * MICRO, SEQ + 1), generator=g)
    out = []
    for i in range(NUM_MICRO):
        t = tokens[i * MICRO:(i + 1) * MICRO]
        mask = torch.ones(MICRO, SEQ)
        mask[0, :5] = 0.0  # masked tokens stay out of the mean
        out.append(dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=mask,
                        position_ids=torch.arange(SEQ).expand(MICRO, SEQ)))
    return out


def log_z_rank(tp: int):
    """log Z and d(sum log Z * w)/d logits of this rank's vocabulary slice of fixed [s, b, V] logits."""
    from megatron.core import parallel_state

    from fpa_megatron.model.gpt import vocab_parallel_log_z
    from fpa_megatron.parallel.state import init_model_parallel

    init_model_parallel(tp, 1, seed=1)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 3, 64, generator=g) * 8.0
    logits[..., 28:] = float("-inf")  # padded columns, as the model masks them (all of rank 1's slice on TP2)
    weights = torch.randn(7, 3, generator=g)
    rank, local = parallel_state.get_tensor_model_parallel_rank(), 64 // tp
    mine = logits[..., rank * local:(rank + 1) * local].clone().requires_grad_(True)
    log_z = vocab_parallel_log_z(mine)
    (log_z * weights).sum().backward()
    return log_z.detach(), mine.grad, logits, weights


def test_log_z_over_a_split_vocabulary_equals_float64_logsumexp():
    (one_z, one_grad, logits, weights), = run_distributed(log_z_rank, 1, 1)
    two = run_distributed(log_z_rank, 2, 2)
    wide = logits.double().requires_grad_(True)
    reference = torch.logsumexp(wide, dim=-1)
    (reference * weights.double()).sum().backward()
    for z in (one_z, two[0][0], two[1][0]):
        torch.testing.assert_close(z.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one_grad.double(), wide.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([two[0][1], two[1][1]], dim=-1).double(), wide.grad, rtol=1e-5, atol=1e-7)


def model_rank(tp: int, state, cp: int = 1):
    """The z-loss model on TP `tp` x CP `cp` (weights: the TP1 rank's, in global names): the step's result, its
    gradients in global names, and at TP1 the full logits of every micro-batch and the LM loss without z-loss."""
    from megatron.core import parallel_state

    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import gather_global, load_global_state
    from fpa_megatron.training.forward_backward import forward_backward

    init_model_parallel(tp, 1, seed=1234, context=cp)
    mc = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, attention_impl="eager")
    penalty = make_penalty(mc, FPAConfig())
    penalty.set_step(0.0, False)
    model = build_gpt_model(mc, VOCAB, penalty, vocab_size=REAL_VOCAB, z_loss=WEIGHT, seed=7)
    if state is not None:
        load_global_state(model, state)
    kwargs = dict(num_microbatches=NUM_MICRO, micro_batch_size=MICRO, seq_length=SEQ)
    result = forward_backward(model, iter(_batches()), penalty, **kwargs)
    if cp > 1:  # what DeepSpeed's average over DP x CP does: each CP rank's gradient is C x its share
        for param in model.parameters():
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_context_parallel_group())
            param.grad /= cp
    grads = gather_global(model, {n: p.grad for n, p in model.named_parameters()})
    out = dict(z_loss=result.z_loss, lm_loss=result.lm_loss, grads=grads)
    if tp * cp == 1:
        out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        with torch.no_grad():
            out["logits"] = [model(b["tokens"], b["position_ids"], None) for b in _batches()]  # [b, s, V]
        plain = build_gpt_model(mc, VOCAB, penalty, vocab_size=REAL_VOCAB, seed=7)
        load_global_state(plain, out["state"])
        out["plain"] = forward_backward(plain, iter(_batches()), penalty, **kwargs)
        out["plain_grads"] = gather_global(plain, {n: p.grad for n, p in plain.named_parameters()})
    return out


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(model_rank, 1, 1, None)[0]


def test_z_loss_matches_a_float64_reference_from_the_logits(tp1):
    per_micro = []
    for batch, logits in zip(_batches(), tp1["logits"]):
        log_z = torch.logsumexp(logits[..., :REAL_VOCAB].double(), dim=-1)  # the padded columns are not the vocab
        mask = batch["loss_mask"].double()
        per_micro.append(float(WEIGHT * (log_z.square() * mask).sum() / mask.sum()))
    reference = sum(per_micro) / len(per_micro)
    assert reference > 0
    assert tp1["z_loss"] == pytest.approx(reference, rel=1e-6)
    assert tp1["plain"].z_loss is None
    assert tp1["lm_loss"] == tp1["plain"].lm_loss  # lm_loss stays the cross-entropy
    name = "embedding.word_embeddings.weight"  # the z-loss does reach the gradients (the tied output layer's)
    assert not torch.allclose(tp1["grads"][name], tp1["plain_grads"][name], rtol=1e-3, atol=0)


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)], ids=["tp2", "cp2"])
def test_z_loss_and_its_gradients_on_tp2_and_cp2_equal_tp1(tp1, tp, cp):
    """TP2 splits the vocabulary (log Z all-reduced over TP); CP2 each sequence (the masked mean in shares)."""
    ranks = run_distributed(model_rank, 2, tp, tp1["state"], cp)
    for rank in ranks:
        assert rank["z_loss"] == pytest.approx(tp1["z_loss"], rel=1e-6)
        assert rank["lm_loss"] == pytest.approx(tp1["lm_loss"], rel=1e-6)
    for name, grad in tp1["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return [{k: h[k] for k in ("step", "z_loss", "lm_loss")} for h in train(config_from_dict(values, overrides))]


def test_a_run_logs_z_loss_beside_the_penalty(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                        "vocab_size": 256},
              "optimizer": {"z_loss": 1e-3}, "data": {"mock": True},
              "train": {"steps": 2, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0},
              "checkpoint": {"save_at_end": False, "resume": "none"},
              "logging": {"interval": 1, "dir": str(tmp_path), "run_name": "z"}}
    history = run_distributed(train_rank, 2, values, ["parallel.tensor=2"])[0]
    assert all(h["z_loss"] > 0 for h in history)
    events = EventAccumulator(str(tmp_path / "z"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/z_loss")] == pytest.approx([h["z_loss"] for h in history],
                                                                               rel=1e-6)
    assert "train/penalty" in events.Tags()["scalars"]
