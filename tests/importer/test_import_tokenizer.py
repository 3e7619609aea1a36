"""`fpa-import hf` carries the model directory's tokenizer: copied into the checkpoint, named by the written config
(`data.tokenizer`), hashed as fpa-prep's manifest does. fpa-eval and fpa-generate then need no `--tokenizer`
(even once the model directory is gone), and data encoded with another tokenizer is the usual config error."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.importer.hf_models import VOCAB, save_model
from tests.importer.test_hf_import import fpa_import
from tests.inference.reference_loss import stream_loss_sum

DOCS = ["def f(x):\n    return x * 2\n", "Grüße, 123 and 日本", "the quick brown fox jumps over the lazy dog"]


def _bytelevel(out: Path, seed: int, vocab_size: int = VOCAB) -> Path:
    """A byte-level BPE tokenizer.json (with its tokenizer_config.json naming the eos) trained by fpa-prep."""
    from data_prep.builtin_corpus import gather
    from data_prep.tokenizer import train_bytelevel_bpe

    docs = [d["text"] for d in gather(1 << 15)] + DOCS
    train_bytelevel_bpe(docs, str(out), vocab_size=vocab_size, sample_size=2000, seed=seed)
    (out / "settings.json").unlink()  # a downloaded model directory has the tokenizer files only
    return out / "tokenizer.json"


def _encode(root: Path, tokenizer: str, name: str) -> str:
    """DOCS encoded by fpa-prep with `tokenizer`, merged into one prefix (with its manifest.json)."""
    from data_prep.encode import EncodeOptions, run_encode
    from data_prep.merge import merge_encode_dir

    corpus = root / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 20))
    manifest, status = run_encode(EncodeOptions(inputs=[str(corpus)], tokenizer=tokenizer,
                                                out_dir=str(root / name), name=name, num_shards=1, workers=1,
                                                progress=False))
    assert status == 0, manifest
    merge_encode_dir(str(root / name))
    return str(root / name / name)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("import_tokenizer")
    model_dir = save_model("llama", root / "llama")
    source = _bytelevel(model_dir, seed=1)
    source_bytes = {p.name: p.read_bytes() for p in model_dir.glob("tokenizer*")}
    status, printed, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(root / "imported"),
                                       "--write-config", str(root / "run.yaml")])
    assert status == 0, err
    moved = root / "moved_away"  # the model directory is gone: only the import's copy is left
    shutil.move(str(model_dir), moved)
    return {"root": root, "out": root / "imported", "model": moved, "printed": printed,
            "config": yaml.safe_load((root / "run.yaml").read_text()), "source": str(source),
            "source_bytes": source_bytes}


def test_import_copies_the_tokenizer_and_records_it_with_its_hash(imported):
    from data_prep.common import sha256_file

    out = imported["out"]
    copy = out.resolve() / "tokenizer" / "tokenizer.json"
    assert imported["config"]["data"]["tokenizer"] == str(copy)
    checkpoint_config = yaml.safe_load((out / "iter_0000000" / "config.yaml").read_text())
    assert checkpoint_config["data"]["tokenizer"] == str(copy)
    assert {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()} == imported["source_bytes"]
    note = json.loads((out / "iter_0000000" / "resharded.json").read_text())["tokenizer"]
    assert note["sha256"] == sha256_file(str(copy)) and note["path"] == str(copy)
    assert note["source"] == imported["source"] and note["kind"] == "huggingface"
    assert (note["vocab_size"], note["eod_piece"]) == (VOCAB, "<|endoftext|>")
    assert f"copied to {out / 'tokenizer'}" in imported["printed"]


def test_fpa_eval_of_the_import_needs_no_tokenizer_and_equals_transformers(imported, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from fpa_megatron.inference.cli import eval_main
    from fpa_megatron.inference.evaluate import evaluate

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 3))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert eval_main(["--checkpoint", str(imported["out"]), "--data", str(text), "--no-progress"]) == 0
    got = evaluate(str(imported["out"]), data=str(text), progress=False)  # what fpa-eval printed, unrounded
    assert f"loss {got.loss:.6f}" in printed.getvalue()

    # the reference: transformers' model and the `tokenizers` library on the original (moved) directory
    tok = Tokenizer.from_file(str(imported["model"] / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    tokens = [t for doc in DOCS * 3 for t in tok.encode(doc, add_special_tokens=False).ids + [eod]]
    model = AutoModelForCausalLM.from_pretrained(imported["model"]).eval()
    total = stream_loss_sum(model, tokens, imported["config"]["model"]["seq_length"])
    assert got.tokens == len(tokens) - 1
    assert got.loss == pytest.approx(total / got.tokens, rel=1e-5)


def test_fpa_generate_of_the_import_needs_no_tokenizer(imported):
    from fpa_megatron.inference.cli import generate_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert generate_main(["--checkpoint", str(imported["out"]), "--prompt", "def f(x):",
                              "--max-new-tokens", "4"]) == 0
    assert "def f(x):" in printed.getvalue()


def test_data_of_another_tokenizer_is_the_usual_config_error(imported, tmp_path):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    values = imported["config"]
    values["logging"] = {"dir": str(tmp_path / "runs"), "run_name": "run"}
    same = _encode(tmp_path, str(imported["model"] / "tokenizer.json"), "same")  # the model's own tokenizer
    check_config(config_from_dict(values, [f"data.prefixes=[{same}]", "data.split=80,10,10"]), 1)
    other = _bytelevel(tmp_path / "other_tok", seed=2, vocab_size=290)
    prefix = _encode(tmp_path, str(other), "other")
    with pytest.raises(ConfigError) as err:
        check_config(config_from_dict(values, [f"data.prefixes=[{prefix}]", "data.split=80,10,10"]), 1)
    assert (f"was encoded with the tokenizer {str(other)!r}" in str(err.value)
            and f"data.tokenizer={values['data']['tokenizer']!r} is another model" in str(err.value))


def test_a_tokenizer_that_cannot_be_used_is_named_and_null_imports_without(tmp_path):
    model_dir = save_model("llama", tmp_path / "llama")
    (model_dir / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out"
    status, _, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(out)])
    assert status == 2 and not out.exists()
    assert f"{model_dir / 'tokenizer.json'}" in err and "data.tokenizer=null" in err
    assert len(err.strip().splitlines()) == 1
    status, _, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(out), "data.tokenizer=null",
                                 "--write-config", str(tmp_path / "run.yaml")])
    assert status == 0, err
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["data"]["tokenizer"] is None
    assert not (out / "tokenizer").exists()


def test_a_sentencepiece_tokenizer_model_travels_too(tmp_path):
    """LLaMA-style directories carry a sentencepiece `tokenizer.model`: copied, named, and fpa-eval encodes with it."""
    import random

    import sentencepiece as spm

    from fpa_megatron.inference.evaluate import evaluate

    model_dir = save_model("llama", tmp_path / "llama")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[i:i + 12]) for i in range(0, 3000, 12)),
                                   model_prefix=str(model_dir / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
                                   num_threads=1, minloglevel=2)
    (model_dir / "tokenizer.vocab").unlink()
    out = tmp_path / "imported"
    status, _, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(out),
                                 "--write-config", str(tmp_path / "run.yaml")])
    assert status == 0, err
    copy = out.resolve() / "tokenizer" / "tokenizer.model"
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["data"]["tokenizer"] == str(copy)
    assert copy.read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(words[i:i + 12])}) + "\n" for i in range(0, 240, 12)))
    sp = spm.SentencePieceProcessor(model_file=str(copy))
    expected = sum(len(sp.encode(" ".join(words[i:i + 12]))) + 1 for i in range(0, 240, 12)) - 1
    assert evaluate(str(out), data=str(text), progress=False).tokens == expected  # encoded without --tokenizer
