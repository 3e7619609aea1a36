"""A byte-level BPE tokenizer.json end to end: fpa-prep -> fpa-train (TP2) -> fpa-export hf -> fpa-generate, every id
equal to the `tokenizers` library's own encode; a tokenizer larger than the model, or not the data's, is refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tokenizers import Tokenizer

from tests.data_prep.helpers import read_encode
from tests.inference.test_generate import greedy_loop
from tests.trained_runs import BPE_TEXTS, BPE_VOCAB, bytelevel_run

PROMPT = "def read(path):\n    "
EVERY_CHAR = "".join(chr(c) for c in range(1, 1200)) + "\U0001f600\U0010fffd\ufffd"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return bytelevel_run(tmp_path_factory)


@pytest.fixture(scope="module")
def library(run):
    return Tokenizer.from_file(run["tokenizer"])


def test_data_and_export_encode_like_the_library(run, library):
    from transformers import AutoTokenizer

    eod = library.token_to_id("<|endoftext|>")
    (docs,) = read_encode(run["shards"]).values()
    assert [d.tolist() for d in docs] == [library.encode(t).ids + [eod] for t in run["docs"]]
    out_dir = run["export"]
    # the directory carries the run's tokenizer: transformers loads it (no custom code) and encodes identically
    config = json.loads(open(os.path.join(out_dir, "tokenizer_config.json")).read())
    assert config["eos_token"] == "<|endoftext|>"
    model_config = json.loads(open(os.path.join(out_dir, "config.json")).read())
    assert model_config["eos_token_id"] == eod and model_config["vocab_size"] == BPE_VOCAB
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.eos_token_id == eod and len(tokenizer) == BPE_VOCAB
    unseen = 0
    for text in BPE_TEXTS + [EVERY_CHAR, PROMPT]:
        ids = library.encode(text).ids
        assert tokenizer.encode(text, add_special_tokens=False, verbose=False) == ids, repr(text[:40])
        assert tokenizer(text)["input_ids"] == ids  # no BOS / EOS added by default either
        assert tokenizer.decode(ids) == library.decode(ids, skip_special_tokens=False) == text
        unseen += sum(len(library.id_to_token(i)) == 1 for i in ids)  # single-byte symbols: unmerged bytes
    assert unseen > 100


def test_generate_from_checkpoint_and_export_uses_the_library_ids(run, library, capsys):
    from transformers import AutoModelForCausalLM

    from fpa_megatron.export.hf import load_hf
    from fpa_megatron.inference.cli import generate_main as main
    from fpa_megatron.inference.generate import generate

    model = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    eod = library.token_to_id("<|endoftext|>")
    prompt_ids = library.encode(PROMPT).ids
    expected = greedy_loop(model, prompt_ids, eod, 10)
    assert expected
    for source in (run["checkpoint"], run["export"]):
        loaded = load_hf(source)
        result = generate(loaded.model, loaded.tokenizer, loaded.tokenizer_spec.eod_id, PROMPT, 10)
        assert (result.prompt_ids, result.new_ids) == (prompt_ids, expected)
        assert main(["--checkpoint", source, "--prompt", PROMPT, "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out == PROMPT + library.decode(expected, skip_special_tokens=False) + "\n"


def _bigger_tokenizer(directory, vocab: int) -> str:
    """A word-level tokenizer.json of `vocab` tokens with the EOD token."""
    from tokenizers import models

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab - 1)}, unk_token="w0"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(directory, "tokenizer.json"))
    return os.path.join(directory, "tokenizer.json")


def test_a_tokenizer_larger_than_the_model_is_refused_before_writing(run, tmp_path, capsys):
    from fpa_megatron.export.cli import main as export
    from fpa_megatron.inference.cli import generate_main as generate

    big = _bigger_tokenizer(tmp_path / "big", 600)  # the checkpoint's embedding has 512 rows (300 padded for TP2)
    out = tmp_path / "out"
    assert export(["hf", "--checkpoint", run["checkpoint"], "--out", str(out), "--tokenizer", big]) == 2
    assert "vocabulary of 600 is larger than the checkpoint's embedding (512 rows)" in capsys.readouterr().err
    assert not out.exists()
    assert generate(["--checkpoint", run["checkpoint"], "--prompt", "w1", "--tokenizer", big]) == 2
    assert "larger than the checkpoint's embedding" in capsys.readouterr().err


def test_training_config_errors_name_the_tokenizer(run, tmp_path):
    from data_prep.cli import main as prep
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    values = json.loads(json.dumps(run["values"]))
    # another byte-level BPE (another seed): the data's token ids would mean other pieces
    other = tmp_path / "other"
    assert prep(["tokenizer", "--type", "bpe-bytelevel", "-i", run["corpus"], "--out", str(other),
                 "--vocab-size", str(BPE_VOCAB), "--sample-size", "50", "--seed", "2"]) == 0
    values["data"]["tokenizer"] = str(other)
    with pytest.raises(ConfigError, match="was encoded with the tokenizer .*tokenizer.json.* is another model"):
        check_config(config_from_dict(values), 2)
    # the same tokenizer, moved: accepted (the hash is what counts)
    moved = shutil.copytree(run["tokenizer_dir"], tmp_path / "moved")
    values["data"]["tokenizer"] = str(moved / "tokenizer.json")
    assert check_config(config_from_dict(values), 2).tokenizer_vocab_size == BPE_VOCAB
    # data encoded with another EOD (--eod-piece) than the tokenizer's eos, which training and export use
    piece = Tokenizer.from_file(run["tokenizer"]).id_to_token(40)
    assert prep(["encode", "-i", run["corpus"], "--tokenizer", run["tokenizer_dir"], "--out-dir", str(tmp_path / "eod"),
                 "--eod-piece", piece, "--workers", "1", "--num-shards", "1", "--no-progress"]) == 0
    eod_values = json.loads(json.dumps(values))
    eod_values["data"]["prefixes"] = [str(tmp_path / "eod" / "data_00000")]
    with pytest.raises(ConfigError, match=f"end-of-document token '{piece}'=40 .*eos '<\\|endoftext\\|>'=0"):
        check_config(config_from_dict(eod_values), 2)
    # a model vocabulary smaller than the tokenizer's
    values["model"]["vocab_size"] = BPE_VOCAB - 1
    with pytest.raises(ConfigError, match=f"model.vocab_size={BPE_VOCAB - 1} is smaller than the vocabulary"):
        check_config(config_from_dict(values), 2)
    # a tokenizer.json without an eos token
    values["model"]["vocab_size"] = None
    os.unlink(moved / "tokenizer_config.json")
    data = json.loads((moved / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|sep|>"
    data["model"]["vocab"] = {("<|sep|>" if k == "<|endoftext|>" else k): v for k, v in data["model"]["vocab"].items()}
    (moved / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="data.tokenizer=.*no eos token.*--eod-piece"):
        check_config(config_from_dict(values), 2)
