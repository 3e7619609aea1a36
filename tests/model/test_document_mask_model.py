"""Document masking through the whole model: a packed sample gives the same per-token losses, penalty, [L, H]
record, attention diagnostics and gradients as running each of its documents as its own sequence (float64,
learned and rotary positions, grouped-query attention, both penalty targets, the blockwise and eager kernels,
a document of one token, a document that fills the sample, a sample with no EOD; one gloo rank)."""

from __future__ import annotations

import pytest
import torch

from fpa_megatron.testing import run_distributed

EOD, VOCAB, SEQ, LAMBDA = 0, 64, 40, 0.3
# documents of a packed sample: one of 1 token, the last one open (no EOD at the end)
LENGTHS = [7, 1, 13, 4]


def _sample(lengths):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, VOCAB, (1, SEQ + 1), generator=g)
    end = 0
    for n in lengths:
        end += n
        tokens[0, end - 1] = EOD
    return tokens[:, :-1], tokens[:, 1:]


def _packed_and_separate(position_embedding: str, impl: str, target: str, lengths: list):
    from fpa_megatron.attention.documents import document_ids, document_positions
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel

    init_model_parallel(1, 1, seed=1)
    mc = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=SEQ,
                     position_embedding=position_embedding, attention_impl=impl, dtype="fp64", init_std=0.3)
    penalty = make_penalty(mc, FPAConfig(target=target))
    model = build_gpt_model(mc, VOCAB, penalty, seed=3, document_positions=True)
    tokens, labels = _sample(lengths)
    docs = document_ids(tokens, EOD)

    def run(tok, lab, positions, mask):
        model.zero_grad(set_to_none=True)
        penalty.reset_record()
        penalty.set_step(LAMBDA, True)
        penalty.stats.reset()
        penalty.stats.measuring = True  # the diagnostics of this forward (no grad needed: they observe)
        losses = model(tok, positions, mask, labels=lab)
        penalty.stats.measuring = False
        losses.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return losses.detach()[0], penalty.record.clone(), penalty.stats.collision.clone(), grads

    packed = run(tokens, labels, document_positions(docs), docs)
    separate = []
    start = 0
    for n in [n for n in lengths + [SEQ - sum(lengths)] if n > 0]:
        part = slice(start, start + n)
        separate.append((n, run(tokens[:, part], labels[:, part], torch.arange(n)[None], None)))
        start += n
    return packed, separate


VARIANTS = [("rope", "blockwise", "probs", LENGTHS), ("learned", "blockwise", "logits", LENGTHS),
            ("rope", "eager", "probs", LENGTHS), ("rope", "blockwise", "probs", [SEQ]),  # one document fills it
            ("learned", "blockwise", "probs", [])]  # no EOD: one open document


def _all_variants():
    from fpa_megatron.parallel.state import destroy_model_parallel

    results = []
    for variant in VARIANTS:
        results.append(_packed_and_separate(*variant))
        destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def variants():
    (results,) = run_distributed(_all_variants, 1)  # one spawn for all of them
    return results


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[f"{p}-{i}-{t}-{len(n)}docs" for p, i, t, n in VARIANTS])
def test_a_packed_sample_equals_its_documents_run_one_by_one(variants, index):
    packed, separate = variants[index]
    losses, record, collision, grads = packed
    torch.testing.assert_close(losses, torch.cat([run[0] for _, run in separate]), rtol=1e-12, atol=1e-12)
    # the penalty of a sample is the sum of its rows' collisions: the documents' penalties add up
    torch.testing.assert_close(record, sum(run[1] for _, run in separate), rtol=1e-12, atol=1e-12)
    assert float(record.sum()) > 0
    # diagnostics are means over rows: the packed one is the documents' means weighted by their lengths
    torch.testing.assert_close(collision, sum(n * run[2] for n, run in separate) / SEQ, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sum(run[3][name] for _, run in separate), rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
