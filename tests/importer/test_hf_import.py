"""`fpa-import hf`: tiny random transformers models (GPT-2, GPT-NeoX, LLaMA with GQA) imported at TP2 x PP2 compute
the transformers logits and loss in Megatron's pipeline, export back to the same tensors, and train from
`checkpoint.init_from` the same at TP2 x PP2 as at TP1 x PP1, from step 0 with lambda_0; bad inputs are refused
before anything is written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tests.importer.hf_models import FAMILIES, SEQ, VOCAB, probe_tokens, save_model

STEPS, MICRO, GLOBAL, LAMBDA0, GAMMA = 3, 2, 8, 0.05, 0.9
_CACHE: dict = {}


def fpa_import(argv: list[str]) -> tuple[int, str, str]:
    from fpa_megatron.importer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def run_values(written_config: str, run_dir: Path, tensor: int, pipeline: int) -> dict:
    """The config `fpa-import --write-config` wrote, made a short mock-data run at the given layout."""
    values = yaml.safe_load(Path(written_config).read_text())
    values["parallel"].update(tensor=tensor, pipeline=pipeline)
    values["fpa"].update(lambda0=LAMBDA0, gamma=GAMMA)
    values["optimizer"].update(lr=1e-3, min_lr=1e-4, warmup_steps=1)
    values["data"].update(mock=True)
    values["train"].update(steps=STEPS, micro_batch_size=MICRO, global_batch_size=GLOBAL, seed=3, eval_interval=0)
    values["checkpoint"].update(dir=str(run_dir / "checkpoints"), resume="none")
    values["logging"].update(dir=str(run_dir.parent), run_name=run_dir.name, interval=1, tensorboard=False,
                             attention_stats_interval=0)
    return values


def probe_and_train(import_dir: str, probe: torch.Tensor, layouts: dict) -> dict:
    """On 4 ranks: load the import's weights at TP2 x PP2 as checkpoint.init_from does (the import holds weights only)
    and read its logits and the trainer's loss through the pipeline; then train 3 steps from checkpoint.init_from in
    every layout."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.parallel.weights import load_global_state
    from fpa_megatron.checkpoint.reader import initial_weights, read_model_checkpoint
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.training.optimizer import build_engine
    from fpa_megatron.training.trainer import train
    from tests.trained_runs import _pipeline_logits

    cfg = config_from_dict(layouts["tp2pp2"])
    layout = check_config(cfg, 4)
    init_model_parallel(2, 2, cfg.train.seed + 1)  # a fresh model: its weights come only from the files
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size,
                            vocab_size=layout.vocab_size)
    load_global_state(model, initial_weights(import_dir, layout.padded_vocab_size))
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, MICRO, 1)
    state = read_model_checkpoint(import_dir).trainer_state
    logits = _pipeline_logits(model, probe[:, :SEQ])
    penalty.set_step(0.0, False)
    batch = {"tokens": probe[:, :SEQ], "labels": probe[:, 1:], "loss_mask": torch.ones(MICRO, SEQ),
             "position_ids": torch.arange(SEQ).expand(MICRO, SEQ)}
    loss = forward_backward(model, iter([batch]), penalty, num_microbatches=1, micro_batch_size=MICRO,
                            seq_length=SEQ, forward_only=True, engine=engine).lm_loss
    out = {"logits": logits, "loss": loss, "trainer_state": state}
    for name, values in layouts.items():
        out[name] = train(config_from_dict(values))
    return out


def import_only(tmp_path_factory, family: str) -> dict:
    """One family's saved model and its `fpa-import` at TP2 x PP2 (with --write-config), once per session."""
    key = ("import", family)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"import_{family}")
        model_dir = save_model(family, root / "hf")
        status, printed, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(root / "imported"),
                                           "--tensor", "2", "--pipeline", "2", "--write-config",
                                           str(root / "run.yaml")])
        assert status == 0, err
        _CACHE[key] = {"root": root, "model_dir": model_dir, "printed": printed}
    return _CACHE[key]


def imported(tmp_path_factory, family: str) -> dict:
    """The import, transformers' own logits and loss, and what 4 ranks measured (see probe_and_train)."""
    if family in _CACHE:
        return _CACHE[family]
    from transformers import AutoModelForCausalLM

    from fpa_megatron.testing import run_distributed

    run = import_only(tmp_path_factory, family)
    root = run["root"]
    hf = AutoModelForCausalLM.from_pretrained(run["model_dir"]).eval()
    probe = probe_tokens(MICRO, SEQ + 1)
    with torch.no_grad():
        hf_logits = hf(probe[:, :SEQ]).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.double().reshape(-1, VOCAB), probe[:, 1:].reshape(-1))
    layouts = {name: run_values(str(root / "run.yaml"), root / name, t, p)
               for name, (t, p) in {"tp2pp2": (2, 2), "tp1pp1": (1, 1)}.items()}
    per_rank = run_distributed(probe_and_train, 4, str(root / "imported"), probe, layouts, timeout_s=600)
    _CACHE[family] = dict(run, hf=hf, hf_logits=hf_logits, hf_loss=float(hf_loss), layouts=layouts,
                          ranks=per_rank, logits=next(r["logits"] for r in per_rank if r["logits"] is not None))
    return _CACHE[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_model_computes_the_transformers_logits_and_loss(tmp_path_factory, family):
    run = imported(tmp_path_factory, family)
    assert "TP2 x PP2" in run["printed"] and "padded to 512" in run["printed"]
    logits = run["logits"]  # the TP2 x PP2 Megatron model loaded by DeepSpeed, through its pipeline
    assert logits.shape == (MICRO, SEQ, 512)
    assert run["hf_logits"].abs().max() > 3.0  # sharp enough that a wrong head order, rotary or GeLU would show
    torch.testing.assert_close(logits[..., :VOCAB], run["hf_logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))  # zero padded rows: logit 0
    # ... which the trainer's loss leaves out: its loss at step 0 is transformers' (float64 reference above)
    assert run["ranks"][0]["loss"] == pytest.approx(run["hf_loss"], rel=1e-5)
    assert run["ranks"][0]["trainer_state"]["step"] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_of_the_import_is_the_original_tensor_for_tensor(tmp_path_factory, family):
    from fpa_megatron.export.cli import main as export_main

    run = imported(tmp_path_factory, family)
    out = run["root"] / "exported"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main(["hf", "--checkpoint", str(run["root"] / "imported"), "--out", str(out)]) == 0
    original = run["hf"].state_dict()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    source = json.loads((run["model_dir"] / "config.json").read_text())
    for key in ("model_type", "vocab_size", "tie_word_embeddings"):
        assert config.get(key) == source.get(key), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_from_the_import_is_the_same_in_every_layout_and_starts_at_step_0(tmp_path_factory, family):
    from fpa_megatron.export.hf import split_qkv
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    run = imported(tmp_path_factory, family)
    tp2, tp1 = run["ranks"][0]["tp2pp2"], run["ranks"][0]["tp1pp1"]
    assert [h["step"] for h in tp2] == [1, 2, 3] and all(h["applied"] for h in tp2)
    assert [h["lambda"] for h in tp2] == pytest.approx([LAMBDA0, LAMBDA0 * GAMMA, LAMBDA0 * GAMMA ** 2])
    assert tp2[0]["lm_loss"] == pytest.approx(run["hf_loss"], rel=0.2)  # the pretrained model's loss, not ln(V)
    for a, b in zip(tp2, tp1):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    final = {name: read_model_checkpoint(run["root"] / name / "checkpoints") for name in ("tp2pp2", "tp1pp1")}
    assert final["tp2pp2"].step == final["tp1pp1"].step == STEPS
    start = read_model_checkpoint(run["root"] / "imported").state_dict
    a, b = final["tp2pp2"].state_dict, final["tp1pp1"].state_dict
    assert sorted(a) == sorted(b)
    moved = 0.0
    for name in a:
        rows = min(a[name].shape[0], b[name].shape[0])  # the vocabulary is padded to 512 at TP2, 384 at TP1
        x, y = a[name][:rows], b[name][:rows]
        if name.endswith("linear_qkv.bias"):
            # The key bias adds q . b_k to every score of a row: softmax ignores it, its gradient is 0 up to
            # rounding, and AdamW turns that rounding into steps of up to lr. Queries and values must agree.
            (qx, kx, vx), (qy, ky, vy) = (split_qkv(t, 4, 4) for t in (x, y))
            assert (kx - ky).abs().max() <= 3 * 1e-3 * 1.01, name
            x, y = torch.cat([qx, vx]), torch.cat([qy, vy])
        # AdamW's first steps are about lr x sign(gradient): small gradients amplify reduction-order differences
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)
        moved = max(moved, float((a[name][:rows] - start[name][:rows]).abs().max()))
        if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
            assert not a[name][VOCAB:].any() and not b[name][VOCAB:].any()  # padded rows: no gradient, still zero
    assert moved > 1e-4  # the three steps did train


def test_exported_directory_loads_and_computes_a_loss_without_a_word(tmp_path_factory):
    """Export hygiene: transformers says nothing (no warning, no log line) loading an export and computing a loss."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from fpa_megatron.export.cli import main as export_main
    from fpa_megatron.export.hf import load_hf

    for family in FAMILIES:
        run = import_only(tmp_path_factory, family)
        out = run["root"] / "exported_quiet"
        with contextlib.redirect_stdout(io.StringIO()):
            assert export_main(["hf", "--checkpoint", str(run["root"] / "imported"), "--out", str(out)]) == 0
        records = io.StringIO()
        handler = logging.StreamHandler(records)
        hf_logging.get_logger().addHandler(handler)
        hf_logging.disable_progress_bar()
        try:
            with warnings.catch_warnings(record=True) as shown:
                warnings.simplefilter("always")
                model = load_hf(out).model
                tokens = probe_tokens(MICRO, SEQ)
                model(tokens, labels=tokens)
                AutoModelForCausalLM.from_pretrained(out)
        finally:
            hf_logging.get_logger().removeHandler(handler)
            hf_logging.enable_progress_bar()
        assert records.getvalue() == "", (family, records.getvalue())
        assert [str(w.message) for w in shown] == [], family


# ------------------------------------------------------------------------------------------ bad input


def _refused(tmp_path: Path, model_dir: Path, *extra: str) -> str:
    out = tmp_path / "out"
    status, printed, err = fpa_import(["hf", "--model", str(model_dir), "--out", str(out), *extra])
    assert status == 2, printed
    assert not out.exists()  # nothing written
    return err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("bad") / "llama")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    err = _refused(tmp_path, tmp_path / "bert")
    assert "model_type='bert' is not a supported architecture" in err and "gpt_neox" in err


@pytest.mark.parametrize("family,changes,message", [
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_scaling / rope_parameters.rope_type='linear'"),
    ("neox", {"use_parallel_residual": True}, "use_parallel_residual=true"),
    ("neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
     "partial_rotary_factor=0.25"),
    ("neox", {"attention_bias": False}, "attention_bias=false"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
])
def test_options_megatron_cannot_compute_are_named(tmp_path, family, changes, message):
    err = _refused(tmp_path, save_model(family, tmp_path / family, **changes))
    assert message in err and "config.json" in err


def test_mistral_sliding_window_is_named(tmp_path):
    import transformers

    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, sliding_window=16)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    assert "sliding_window=16" in _refused(tmp_path, tmp_path / "mistral")


def test_vocabulary_larger_than_the_checkpoints_is_named(tmp_path, llama_dir):
    err = _refused(tmp_path, llama_dir, "model.vocab_size=400")
    assert "model.vocab_size=400" in err and "larger than the checkpoint's" in err and f"{VOCAB} rows" in err


def test_overriding_the_architecture_is_named(tmp_path, llama_dir):
    err = _refused(tmp_path, llama_dir, "model.num_layers=4")
    assert "model.num_layers=4" in err and "gives 2" in err
    assert "not divisible by parallel.tensor=8" in _refused(tmp_path, llama_dir, "--tensor", "8")


def test_out_that_is_not_empty_is_refused(tmp_path, llama_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    status, _, err = fpa_import(["hf", "--model", str(llama_dir), "--out", str(tmp_path / "out")])
    assert status == 2 and "not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["file"]


def test_init_from_that_is_not_a_checkpoint_or_of_another_shape_is_a_config_error(tmp_path, llama_dir):
    from fpa_megatron.config import ConfigError, config_from_dict
    from fpa_megatron.preflight import check_config

    status, _, err = fpa_import(["hf", "--model", str(llama_dir), "--out", str(tmp_path / "imported"),
                                 "--write-config", str(tmp_path / "run.yaml")])
    assert status == 0, err
    values = run_values(str(tmp_path / "run.yaml"), tmp_path / "run", 1, 1)
    check_config(config_from_dict(values), 1)  # as written: valid
    with pytest.raises(ConfigError, match=r"checkpoint.init_from='.*nowhere' is not a valid checkpoint"):
        check_config(config_from_dict(values, [f"checkpoint.init_from={tmp_path / 'nowhere'}"]), 1)
    with pytest.raises(ConfigError, match=r"init_from=.*model.hidden_size=64, this run model.hidden_size=32"):
        check_config(config_from_dict(values, ["model.hidden_size=32"]), 1)
    with pytest.raises(ConfigError, match=r"checkpoint.init_from=.*vocabulary has 300 tokens, this run's 512"):
        check_config(config_from_dict(values, ["model.vocab_size=512"]), 1)
    # the import holds weights only: resuming from it is named, with the two ways on
    with pytest.raises(ConfigError, match=r"checkpoint.resume=.*holds weights only .*checkpoint.init_from=.*fpa-reshard"):
        check_config(config_from_dict(values, [f"checkpoint.resume={tmp_path / 'imported'}"]), 1)


def test_tokenizer_larger_than_the_checkpoints_vocabulary_is_named(tmp_path, llama_dir):
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[i:i + 12]) for i in range(0, 3000, 12)),
                                   model_prefix=str(tmp_path / "tok"), vocab_size=400, model_type="bpe",
                                   num_threads=1, minloglevel=2)
    err = _refused(tmp_path, llama_dir, f"data.tokenizer={tmp_path / 'tok.model'}")
    assert "tok.model' has 400 tokens, more than the checkpoint's vocabulary (300 rows" in err


@pytest.mark.parametrize("verify", [True, False], ids=["checked", "no-verify"])
def test_an_import_with_corrupted_weights_is_refused_and_leaves_nothing(tmp_path, llama_dir, monkeypatch, verify):
    """A mapping that changes one weight (the first layer's query/key/value rows scaled by 1.5) is caught by the
    import's own check; a correct import says what it measured; --no-verify writes the corrupted one anyway."""
    import re

    from fpa_megatron.importer import hf

    status, printed, err = fpa_import(["hf", "--model", str(llama_dir), "--out", str(tmp_path / "good")])
    found = re.search(r"verified: logits of the transformers model vs the checkpoint's own model on a fixed "
                      r"sample of 2 x \d+ tokens: max \|difference\| (\S+) <= 1e-03", printed)
    assert status == 0 and found and float(found.group(1)) <= 1e-3, (printed, err)

    mapped = hf.megatron_state

    def corrupted(*args, **kwargs):
        weights = mapped(*args, **kwargs)
        name = next(n for n in weights if "layers.0." in n and "linear_qkv.weight" in n)
        return {**weights, name: weights[name] * 1.5}

    monkeypatch.setattr(hf, "megatron_state", corrupted)
    out = tmp_path / "bad"
    status, printed, err = fpa_import(["hf", "--model", str(llama_dir), "--out", str(out)]
                                      + ([] if verify else ["--no-verify"]))
    if not verify:
        assert status == 0 and (out / "latest").is_file() and "verified" not in printed, (printed, err)
        return
    assert status == 2 and err.startswith(f"fpa-import: error: the import does not reproduce {llama_dir}"), err
    difference = float(err.split("max |difference| ")[1].split()[0])
    assert difference > 1e-3 and f"{out} was removed" in err and not out.exists()
