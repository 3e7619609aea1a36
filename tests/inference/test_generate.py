"""`fpa-generate` against a greedy loop written here with the exported transformers model."""

from __future__ import annotations

import pytest
import torch

from tests.trained_runs import exported, trained_runs

PROMPT = "def read(path):\n    "


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


def greedy_loop(model, ids: list[int], eod: int, max_new: int) -> list[int]:
    """The reference: full forward each step, argmax of the last position, stop at EOD."""
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            next_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == eod:
                break
            new.append(next_id)
    return new


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_output_equals_a_greedy_loop(runs, tmp_path_factory, capsys, family):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fpa_megatron.export.hf import load_hf
    from fpa_megatron.inference.cli import generate_main as main
    from fpa_megatron.inference.generate import generate

    out_dir = exported(tmp_path_factory, family)[0]
    sp = spm.SentencePieceProcessor(model_file=runs["data"]["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    expected = greedy_loop(model, sp.encode(PROMPT), sp.eos_id(), 12)
    assert len(expected) >= 3  # something to compare
    # (decoded with the exported tokenizer: on byte runs that are not valid UTF-8 it differs from sentencepiece)
    text = AutoTokenizer.from_pretrained(out_dir).decode(expected)
    for source in (runs["runs"][family]["checkpoint"], str(out_dir)):  # training checkpoint, exported directory
        assert main(["--checkpoint", source, "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
        printed = capsys.readouterr()
        assert printed.out == PROMPT + text + "\n"
        assert f"{len(expected)} new tokens, greedy" in printed.err
        loaded = load_hf(source)
        assert generate(loaded.model, loaded.tokenizer, 2, PROMPT, 12).new_ids == expected


def test_sampling_is_seeded_and_top_k_1_is_greedy(runs, tmp_path_factory):
    from fpa_megatron.export.hf import load_hf
    from fpa_megatron.inference.generate import generate

    loaded = load_hf(exported(tmp_path_factory, "llama")[0])
    args = (loaded.model, loaded.tokenizer, 2, PROMPT, 16)
    greedy = generate(*args)
    assert generate(*args, temperature=5.0, top_k=1, seed=1).new_ids == greedy.new_ids
    first = generate(*args, temperature=1.5, top_p=0.95, seed=7)
    assert generate(*args, temperature=1.5, top_p=0.95, seed=7).new_ids == first.new_ids
    others = [generate(*args, temperature=1.5, seed=s).new_ids for s in range(3)]
    assert len({tuple(o) for o in others}) > 1  # different seeds, different samples
    assert generate(*args[:3], "", 4).prompt_ids == [2]  # an empty prompt starts a new document


def test_bad_options_are_errors(runs, capsys):
    from fpa_megatron.inference.cli import generate_main as main

    checkpoint = runs["runs"]["gpt2"]["checkpoint"]
    assert main(["--checkpoint", checkpoint, "--prompt", "x", "--top-k", "5"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["--checkpoint", checkpoint, "--prompt", "x", "--temperature", "1", "--top-p", "1.5"]) == 2
    assert main(["--checkpoint", str(runs["runs"]["gpt2"]["checkpoint"]) + "_missing", "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
