"""`fpa-eval --tasks`: lm-evaluation-harness on a local multiple-choice task (a YAML and a JSONL written here), its
accuracy equal to the one computed here from the exported model's log-likelihood of each choice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from tests.trained_runs import bytelevel_run

pytest.importorskip("lm_eval")

ITEMS = [  # (question, choices, index of the right one)
    ("def add(a, b):\n    return", [" a + b", " None", " self"], 0),
    ("import os\nos.path.", ["join", "walk(", "sep"], 0),
    ("for i in range(10):", ["\n    print(i)", "\n    pass", " }"], 1),
    ("The capital of France is", [" Paris", " a function", " 42"], 0),
    ("x = [1, 2, 3]\nlen(x) ==", [" 3", " 'three'", " x"], 0),
    ("def __init__(self", [", x, y):", "):", " = 1"], 0),
    ("# Return the", [" value", " 日本語", " \t\t"], 2),
    ("with open(path) as f:\n    data = f.", ["read()", "write", "close"], 1),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return bytelevel_run(tmp_path_factory)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A local lm-eval task: items.jsonl and its YAML (json builder on a local file, accuracy)."""
    root = tmp_path_factory.mktemp("task")
    (root / "items.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (root / "fpa_local_mc.yaml").write_text(
        "task: fpa_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root / "fpa_local_mc.yaml"


def reference_logliks(run) -> list[list[float]]:
    """log p(choice | question) per item and choice: the exported model in transformers, float64 sums, the ids of the
    `tokenizers` library (question and choice encoded apart: each choice starts a pre-token, so they split there;
    no question ends in whitespace, which lm-eval would move into the choice)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    library = Tokenizer.from_file(run["tokenizer"])
    out = []
    with torch.no_grad():
        for question, choices, _ in ITEMS:
            row = []
            for choice in choices:
                context, continuation = library.encode(question).ids, library.encode(choice).ids
                assert library.encode(question + choice).ids == context + continuation
                assert len(context + continuation) - 1 <= 32  # the input fits the model's positions: nothing cut
                logits = model(torch.tensor([context + continuation])).logits[0].double()
                logprobs = torch.log_softmax(logits, dim=-1)[len(context) - 1:-1]
                row.append(float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum()))
            out.append(row)
    return out


def test_task_accuracy_equals_the_one_computed_from_loglikelihoods(run, task, tmp_path, capsys):
    from fpa_megatron.export.hf import load_hf
    from fpa_megatron.inference.cli import eval_main as main
    from fpa_megatron.inference.harness import harness_lm

    reference = reference_logliks(run)
    picks = [max(range(len(row)), key=row.__getitem__) for row in reference]
    accuracy = sum(p == item[2] for p, item in zip(picks, ITEMS)) / len(ITEMS)
    # the harness model's own log-likelihoods, for the requests lm-eval makes of this task
    loaded = load_hf(run["checkpoint"])
    lm = harness_lm(loaded.model, loaded.tokenizer, loaded.tokenizer_spec.eod_id, 32, batch_size=4)
    requests = [SimpleNamespace(args=(q, c)) for q, choices, _ in ITEMS for c in choices]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    expected = [ll for row in reference for ll in row]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    for source, name in ((run["checkpoint"], "checkpoint"), (run["export"], "export")):
        output = tmp_path / f"{name}.json"
        assert main(["--checkpoint", source, "--tasks", str(task), "--output", str(output)]) == 0
        printed = capsys.readouterr().out
        assert "fpa_local_mc" in printed and "acc" in printed
        results = json.loads(output.read_text())
        assert results["results"]["fpa_local_mc"]["acc,none"] == accuracy
        assert results["n-samples"]["fpa_local_mc"]["effective"] == len(ITEMS)
    # by name, with --include-path
    assert main(["--checkpoint", run["export"], "--tasks", "fpa_local_mc", "--include-path", str(task.parent),
                 "--limit", "4"]) == 0
    assert "fpa_local_mc" in capsys.readouterr().out


def test_bad_tasks_and_tokenizers_are_errors(run, task, tmp_path, capsys):
    from tokenizers import models

    from fpa_megatron.inference.cli import eval_main as main

    # (an unknown task name is reported too, after lm-eval indexed its own ~15k tasks: 20 s, not tested here)
    assert main(["--checkpoint", run["export"], "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "no such task file" in capsys.readouterr().err
    big = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(599)}, unk_token="w0"))
    big.add_special_tokens(["<|endoftext|>"])
    big.save(str(tmp_path / "big.json"))
    assert main(["--checkpoint", run["checkpoint"], "--tasks", str(task), "--tokenizer", str(tmp_path / "big.json"),
                 "--output", str(tmp_path / "out.json")]) == 2
    assert "vocabulary of 600 is larger than the checkpoint's embedding" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
