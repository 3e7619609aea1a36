"""`fpa-eval`: the trainer's validation loss on the validation split, and whole files against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.trained_runs import FAMILIES, SEQ, VOCAB, exported, trained_runs
from tests.inference.reference_loss import stream_loss_sum


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_validation_split_gives_the_trainers_validation_loss(runs, capsys, family):
    from fpa_megatron.inference.cli import eval_main as main

    run = runs["runs"][family]
    trainer = run["history"][-1]["val_loss"]  # validated at the last step, right before the checkpoint was saved
    assert math.isfinite(trainer)
    assert main(["--checkpoint", run["checkpoint"], "--split", "valid"]) == 0
    printed = capsys.readouterr()
    loss = float(printed.out.split("loss ")[1].split()[0])
    assert abs(loss - trainer) <= 1e-5 * trainer, (loss, trainer)
    assert "first 2 global batches of 4 x 32 tokens" in printed.out and "256 tokens" in printed.out
    assert "fpa-eval" in printed.err  # the progress bar


def test_raw_text_equals_its_indexed_dataset_and_a_float64_reference(runs):
    from fpa_megatron.data.datasets import dataset_tokens
    from fpa_megatron.inference.evaluate import evaluate, score_stream
    from fpa_megatron.checkpoint.megatron_lm import megatron_lm
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    checkpoint = runs["runs"]["llama"]["checkpoint"]
    tokens = dataset_tokens(runs["data"]["prefix"])
    from_jsonl = evaluate(checkpoint, data=runs["data"]["corpus"], progress=False)  # tokenized here
    from_prefix = evaluate(checkpoint, data=runs["data"]["prefix"], progress=False)  # encoded by fpa-prep
    assert from_prefix.tokens == from_jsonl.tokens == len(tokens) - 1
    assert from_jsonl.loss == pytest.approx(from_prefix.loss, rel=1e-12)
    assert "2 records skipped" in from_jsonl.source  # the empty documents fpa-prep rejected too
    # reference: float64 log-softmax of the logits over the real vocabulary (the trainer's loss leaves the padded
    # columns out), one window at a time
    part = tokens[: SEQ * 5 + 7]  # 5 full windows and a short one
    with megatron_lm(read_model_checkpoint(checkpoint)) as lm:
        got = score_stream(lm.token_losses, part, SEQ, 2, "part", progress=False)
        total = 0.0
        for start in range(0, len(part) - 1, SEQ):
            window = torch.from_numpy(part[start:start + SEQ + 1])
            logp = torch.log_softmax(lm.logits(window[None, :-1]).double()[0, :, :VOCAB], dim=-1)
            total -= float(logp.gather(1, window[1:, None]).sum())
    assert got.tokens == len(part) - 1
    assert got.loss == pytest.approx(total / got.tokens, rel=1e-6)


def test_exported_directory_scores_with_transformers(runs, tmp_path_factory):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    from fpa_megatron.inference.evaluate import evaluate

    out_dir = exported(tmp_path_factory, "gpt2")[0]
    part = tmp_path_factory.mktemp("eval_text") / "part.jsonl"
    part.write_text('{"text": "def f(x):\\n    return x * 2\\n"}\n{"text": "Grüße, 123 and 日本"}\n' * 5)
    got = evaluate(str(out_dir), data=str(part), progress=False)
    sp = spm.SentencePieceProcessor(model_file=runs["data"]["tokenizer"])
    docs = ["def f(x):\n    return x * 2\n", "Grüße, 123 and 日本"] * 5
    tokens = [t for doc in docs for t in sp.encode(doc) + [2]]
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    total = stream_loss_sum(model, tokens, SEQ)
    assert got.tokens == len(tokens) - 1
    assert got.loss == pytest.approx(total / got.tokens, rel=1e-6)
    assert np.isfinite(got.perplexity)
    with pytest.raises(ValueError, match="--split needs a training checkpoint"):
        evaluate(str(out_dir), split="valid")
