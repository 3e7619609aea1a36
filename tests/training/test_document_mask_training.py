"""`data.document_mask` through `train(cfg)` on real gloo ranks: data of short documents (1 to 12 tokens, so every
16-token sample packs several, across the CP chunks and ranks), a LLaMA-shaped model (RoPE, GQA); every layout
follows the single-process run, resume is bitwise, the switch changes the run (the documents stop seeing each
other), fpa-eval reproduces the validation loss, and the Hugging Face export computes one document's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fpa_megatron.testing import run_distributed

VOCAB = 256
EOD = VOCAB - 1  # the EOD of the tokenizer a run without data.tokenizer uses (MockTokenizer)
KEYS = ("lm_loss", "penalty", "lambda", "lr", "grad_norm")


def write_short_documents(prefix: str, count: int = 600, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(count):
        n = int(rng.integers(0, 12))
        doc = np.concatenate([rng.integers(1, EOD, size=n), [EOD]])
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _base(prefix: str, log_dir: str) -> dict:
    return {
        "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                  "seq_length": 16, "vocab_size": VOCAB, "init_std": 0.2, "normalization": "RMSNorm",
                  "activation": "swiglu", "ffn_hidden_size": 64, "tie_embeddings": False},  # LLaMA: exports
        "fpa": {"lambda0": 0.2, "gamma": 0.9},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "zero_stage": 1},
        "data": {"prefixes": [prefix], "split": "90,5,5", "document_mask": True},
        "train": {"steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 0, "seed": 3},
        "checkpoint": {"save_at_end": False, "resume": "none"},
        "logging": {"interval": 1, "tensorboard": False, "dir": log_dir},
    }


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    history = train(config_from_dict(values, overrides))
    return [{k: h[k] for k in KEYS + ("step", "val_loss") if k in h} for h in history]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_short_documents(str(root / "short"))
    return root


def _run(data, world: int, overrides: list[str], name: str):
    values = _base(str(data / "short"), str(data / "runs"))
    return run_distributed(train_rank, world, values, overrides + [f"logging.run_name={name}"])[0]


@pytest.fixture(scope="module")
def single(data):
    """The single-process reference; it also validates and saves at its last step."""
    return _run(data, 1, ["train.eval_interval=4", "train.eval_iters=2", "checkpoint.save_at_end=true",
                          f"checkpoint.dir={data / 'single-ckpt'}"], "single")


def test_fpa_eval_split_gives_the_trainers_validation_loss(data, single, capsys):
    from fpa_megatron.inference.cli import eval_main

    trainer = single[-1]["val_loss"]
    assert math.isfinite(trainer)
    assert eval_main(["--checkpoint", str(data / "single-ckpt"), "--split", "valid"]) == 0
    loss = float(capsys.readouterr().out.split("loss ")[1].split()[0])
    assert abs(loss - trainer) <= 1e-5 * trainer, (loss, trainer)


def test_the_switch_masks_the_other_documents(data, single):
    unmasked = _run(data, 1, ["data.document_mask=false"], "unmasked")
    assert all(math.isfinite(h["lm_loss"]) for h in single)
    assert abs(unmasked[0]["lm_loss"] - single[0]["lm_loss"]) > 1e-3 * single[0]["lm_loss"]
    assert abs(unmasked[0]["penalty"] - single[0]["penalty"]) > 1e-3 * single[0]["penalty"]


@pytest.mark.parametrize("world,overrides", [
    (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2",
         "parallel.virtual_pipeline=2"]),
    (4, ["parallel.context=2", "parallel.tensor=2"]),
    (4, ["parallel.context=2", "optimizer.zero_stage=2"]),  # CP2 x DP2
], ids=["tp2-sp-pp2-vp2", "cp2-tp2", "cp2-dp2-zero2"])
def test_layouts_match_single_process(data, single, world, overrides):
    got = _run(data, world, overrides, "layout")
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for mine, ref in zip(got, single):
        for key in ("lm_loss", "penalty", "grad_norm"):
            assert math.isfinite(ref[key]) and abs(mine[key] - ref[key]) <= 1e-4 * abs(ref[key]), (key, mine, ref)


def test_resume_is_bitwise(data, tmp_path):
    common = ["parallel.context=2", "train.steps=6", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto"]
    straight = _run(data, 2, ["parallel.context=2", "train.steps=6"], "straight")
    first = _run(data, 2, common + ["train.exit_interval=3"], "resumed")
    second = _run(data, 2, common, "resumed")
    resumed = first + second
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    for mine, want in zip(resumed, straight):
        for key in KEYS:
            assert math.isfinite(want[key]) and mine[key] == want[key], (key, mine, want)


def test_an_exported_model_sees_one_document(data, single, tmp_path):
    """Hugging Face models have no document masking: a prompt is one document. The export of a document-masked
    run computes, on one document, the logits the run's model computes for it inside a packed sample."""
    from transformers import AutoModelForCausalLM

    from fpa_megatron.attention.documents import document_ids, document_positions
    from fpa_megatron.checkpoint.megatron_lm import megatron_lm
    from fpa_megatron.checkpoint.reader import read_model_checkpoint
    from fpa_megatron.export.cli import main as export_main

    assert export_main(["hf", "--checkpoint", str(data / "single-ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(2)
    first, second = torch.randint(1, EOD, (1, 6), generator=g), torch.randint(1, EOD, (1, 9), generator=g)
    packed = torch.cat([first, torch.tensor([[EOD]]), second], dim=1)  # two documents
    docs = document_ids(packed, EOD)
    with megatron_lm(read_model_checkpoint(data / "single-ckpt")) as lm, torch.no_grad():
        masked = lm.model(packed, document_positions(docs), docs).float()  # [1, s, padded vocab]
        with torch.no_grad():
            alone = hf(second).logits
            together = hf(packed).logits
    torch.testing.assert_close(alone, masked[:, 7:, :VOCAB], rtol=1e-4, atol=1e-4)  # the second document alone
    torch.testing.assert_close(hf(first).logits.detach(), masked[:, :6, :VOCAB], rtol=1e-4, atol=1e-4)
    # the packed sequence is one document to transformers: its second part sees the first
    assert (together[:, 7:] - alone).abs().max() > 1e-3
