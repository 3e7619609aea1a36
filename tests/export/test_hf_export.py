"""`fpa-export hf` from TP2 x PP2 checkpoints written by the trainer: transformers loads the result with no custom
code and computes the same logits; the tokenizer encodes like sentencepiece; unsupported models are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.trained_runs import FAMILIES, TEXTS, VOCAB, exported, probe_tokens, trained_runs

ARCH = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_model_computes_the_megatron_logits(runs, tmp_path_factory, family):
    from transformers import AutoModelForCausalLM

    out_dir, printed, status = exported(tmp_path_factory, family)
    assert status == 0
    assert "model.safetensors" in printed and ARCH[family] in printed and "step 3" in printed
    assert not list(out_dir.glob("*.bin"))  # safetensors only
    model = AutoModelForCausalLM.from_pretrained(out_dir)  # no trust_remote_code
    assert type(model).__name__ == ARCH[family]
    assert model.config.vocab_size == VOCAB  # the padding to 128 x TP (512 rows) is cut off
    with torch.no_grad():
        logits = model(probe_tokens()).logits
    reference = runs["runs"][family]["logits"]  # the TP2 x PP2 Megatron model, through its pipeline
    assert reference.shape[-1] == 512 and torch.isfinite(reference).all()
    assert reference.abs().max() > 3.0  # sharp enough that a wrong head order or rotary would show
    torch.testing.assert_close(logits, reference[..., :VOCAB], rtol=1e-4, atol=1e-4)
    tied = FAMILIES[family]["tie_embeddings"]
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same == tied


def test_configs_say_what_megatron_computes(tmp_path_factory):
    gpt2 = json.loads((exported(tmp_path_factory, "gpt2")[0] / "config.json").read_text())
    assert gpt2["activation_function"] == "gelu" and gpt2["layer_norm_epsilon"] == 1e-5  # exact erf GeLU
    assert gpt2["n_positions"] == 32 and gpt2["tie_word_embeddings"] is True
    neox = json.loads((exported(tmp_path_factory, "neox")[0] / "config.json").read_text())
    assert neox["use_parallel_residual"] is False and neox["hidden_act"] == "gelu"
    assert neox["rope_parameters"]["partial_rotary_factor"] == 1.0 and neox["rope_parameters"]["rope_theta"] == 10000
    llama = json.loads((exported(tmp_path_factory, "llama")[0] / "config.json").read_text())
    assert llama["num_key_value_heads"] == 2 and llama["num_attention_heads"] == 4 and llama["intermediate_size"] == 96
    assert llama["tie_word_embeddings"] is False and llama["rms_norm_eps"] == 1e-5
    for config in (gpt2, neox, llama):
        assert config["eos_token_id"] == 2 and config["bos_token_id"] == 1 and config["pad_token_id"] == 3


def test_tokenizer_encodes_and_decodes_like_sentencepiece(runs, tmp_path_factory):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir = exported(tmp_path_factory, "gpt2")[0]
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    sp = spm.SentencePieceProcessor(model_file=runs["data"]["tokenizer"])
    assert tokenizer.eos_token_id == sp.eos_id() == 2 and tokenizer.eos_token == "</s>"
    corpus = [json.loads(line)["text"] for line in open(runs["data"]["corpus"], encoding="utf-8")]
    texts = TEXTS + corpus + ["".join(chr(c) for c in range(32, 1200))]
    byte_fallback = 0
    for text in texts:
        ids = sp.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False, verbose=False) == ids, repr(text[:60])
        assert tokenizer.decode(ids) == sp.decode(ids) == text
        byte_fallback += sum(sp.id_to_piece(i).startswith("<0x") for i in ids)
    assert byte_fallback > 10  # unseen characters went through byte pieces, on both sides
    assert tokenizer("x y")["input_ids"] == sp.encode("x y")  # no BOS / EOS added by default


@pytest.mark.parametrize("change,message", [
    ({"position_embedding": "learned", "normalization": "RMSNorm"}, "position_embedding=learned, model.normalization=RMSNorm"),
    ({"position_embedding": "rope", "activation": "swiglu"}, "normalization=LayerNorm, model.activation=swiglu"),
    ({"position_embedding": "rope", "normalization": "RMSNorm"}, "normalization=RMSNorm, model.activation=gelu"),
    ({"position_embedding": "rope", "num_query_groups": 2}, "num_query_groups=2 \\(grouped-query attention\\).*GPT-NeoX"),
    ({"num_query_groups": 2}, "num_query_groups=2 \\(grouped-query attention\\).*GPT-2"),
    ({"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu", "qk_layernorm": True},
     "qk_layernorm"),
])
def test_unsupported_combinations_are_named(change, message):
    from types import SimpleNamespace

    from fpa_megatron.config import ModelConfig
    from fpa_megatron.export.hf import ExportError, hf_architecture

    model = SimpleNamespace(**{**vars(ModelConfig(position_embedding="learned")), **change})
    with pytest.raises(ExportError, match=message):
        hf_architecture(model)


def test_the_export_checks_its_own_logits_and_says_so(runs, tmp_path_factory):
    import re

    _, printed, status = exported(tmp_path_factory, "llama")
    assert status == 0
    found = re.search(r"verified: logits of the transformers model vs the checkpoint's own model on a fixed sample of "
                      r"2 x (\d+) tokens: max \|difference\| (\S+) <= 1e-03", printed)
    assert found, printed
    assert 0.0 <= float(found.group(2)) <= 1e-3 and int(found.group(1)) == 32


@pytest.mark.parametrize("verify", [True, False], ids=["checked", "no-verify"])
def test_an_export_with_corrupted_weights_is_refused_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys, verify):
    """A mapping that changes one weight (the first layer's query/key/value projection scaled by 1.5, the kind of
    mistake a converter makes) is caught by the check; --no-verify writes it anyway."""
    from fpa_megatron.export import hf
    from fpa_megatron.export.cli import main

    mapped = hf.hf_state_dict

    def corrupted(*args, **kwargs):
        state = mapped(*args, **kwargs)
        name = next(n for n in state if ".0." in n and ("q_proj" in n or "query_key_value" in n or "c_attn" in n)
                    and n.endswith("weight"))
        return {**state, name: state[name] * 1.5}

    monkeypatch.setattr(hf, "hf_state_dict", corrupted)
    out = tmp_path / "out"
    argv = ["hf", "--checkpoint", runs["runs"]["llama"]["checkpoint"], "--out", str(out)]
    status = main(argv + ([] if verify else ["--no-verify"]))
    captured = capsys.readouterr()
    if not verify:
        assert status == 0 and (out / "model.safetensors").is_file() and "verified" not in captured.out
        return
    assert status == 2, captured
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("fpa-export: the export does not reproduce the checkpoint"), error
    difference = float(error[0].split("max |difference| ")[1].split()[0])
    assert difference > 1e-3 and f"nothing was written to {out}" in error[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no partial directory either


def test_refusals_happen_before_anything_is_written(runs, tmp_path):
    from fpa_megatron.export.cli import main

    ckpt = shutil.copytree(runs["runs"]["neox"]["checkpoint"], tmp_path / "checkpoints" / "iter_0000003")
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["model"]["normalization"] = "RMSNorm"  # rotary + RMSNorm + GeLU: no standard architecture
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["hf", "--checkpoint", runs["runs"]["gpt2"]["checkpoint"], "--out", str(tmp_path / "taken")]) == 2
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["file"]


def test_missing_transformers_says_what_to_install(monkeypatch):
    import sys

    from fpa_megatron.export.hf import ExportError, require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without the extra looks like
    with pytest.raises(ExportError, match=r"pip install -e \.\[hf\]"):
        require_transformers()


GENERATE_WITHOUT_MEGATRON = r"""
import sys
from fpa_megatron.inference.cli import generate_main as main
code = main(["--checkpoint", sys.argv[1], "--prompt", "def f(x):", "--max-new-tokens", "3"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"megatron", "deepspeed"})
print("HEAVY", heavy)
sys.exit(code)
"""


def test_generating_from_an_exported_directory_imports_no_megatron(runs, tmp_path_factory):
    """An exported directory is a transformers model: fpa-generate on it reads no checkpoint, so it must not
    pay for importing Megatron-core or DeepSpeed (seconds of a 15 s call, before)."""
    import subprocess
    import sys

    out_dir, _, status = exported(tmp_path_factory, "gpt2")
    assert status == 0
    res = subprocess.run([sys.executable, "-c", GENERATE_WITHOUT_MEGATRON, str(out_dir)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout.splitlines(), res.stdout
