"""The config system (YAML, overrides, unknown keys, round trip) and every check of `check_config`.

Each bad config must raise ConfigError whose message names the key and the bad value; all of it runs
before (and without) any process group.
"""

from __future__ import annotations

import copy
import io
import random
from pathlib import Path

import pytest
import torch
import yaml

from fpa_megatron.config import ConfigError, RunConfig, config_from_dict, load_config, save_config
from fpa_megatron.rules import ResolvedLayout, padded_vocab_size
from fpa_megatron.preflight import check_config
from fpa_megatron.data.data_checks import parse_split

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER_VOCAB = 60


@pytest.fixture(autouse=True)
def _no_process_group():
    """Every check here must work before torch.distributed is initialised (and must not initialise it)."""
    assert not torch.distributed.is_initialized()
    yield
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A real sentencepiece model with TOKENIZER_VOCAB pieces (trained in ~0.1 s)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "tensor", "pipeline", "layer", "head", "token", "model"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer,
                                   vocab_size=TOKENIZER_VOCAB, model_type="bpe", minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    path.write_bytes(buffer.getvalue())
    return str(path)


def write_dataset(prefix: str, num_documents: int) -> str:
    """A real Megatron indexed dataset of num_documents short documents (check_config reads its index)."""
    import numpy as np

    from data_prep.indexed import NativeShardWriter

    writer = NativeShardWriter(prefix + ".bin", "uint16")
    for d in range(num_documents):
        writer.add_document(np.arange(d % 7 + 2, dtype=np.uint16))
    writer.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Two prefixes of 100 documents each: every split of 98,1,1 gets at least one."""
    root = tmp_path_factory.mktemp("shards")
    return [write_dataset(str(root / f"corpus_{i:05d}"), 100) for i in range(2)]


def base(tokenizer: str, shards: list[str]) -> dict:
    """A valid config for world size 4."""
    return {
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32},
        "parallel": {"tensor": 1, "pipeline": 1},
        "data": {"prefixes": list(shards), "tokenizer": tokenizer, "split": "98,1,1"},
        "train": {"steps": 10, "micro_batch_size": 2, "global_batch_size": 16},
        "checkpoint": {"resume": "none"},
    }


def check(tokenizer, shards, overrides=(), world_size=4) -> ResolvedLayout:
    return check_config(config_from_dict(base(tokenizer, shards), list(overrides)), world_size)


# ------------------------------------------------------------------------------------------ config.py


def test_yaml_load_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 6, "activation": "swiglu"}, "fpa": {"lambda0": 0.5}}))
    cfg = load_config(path, ["model.num_layers=8", "fpa.gamma=0.5", "data.prefixes=[a/b,c/d]",
                             "optimizer.decay_steps=null", "logging.tensorboard=false"])
    assert cfg.model.num_layers == 8  # the override wins over the file
    assert cfg.model.activation == "swiglu"  # from the file
    assert cfg.fpa.lambda0 == 0.5 and cfg.fpa.gamma == 0.5
    assert cfg.data.prefixes == ["a/b", "c/d"]
    assert cfg.optimizer.decay_steps is None and cfg.logging.tensorboard is False
    assert cfg.model.hidden_size == RunConfig().model.hidden_size  # untouched default
    assert cfg.logging.run_name == "run"  # the file's stem


@pytest.mark.parametrize("source", ["file", "override"])
def test_unknown_keys_are_rejected(tmp_path, source):
    path = tmp_path / "run.yaml"
    if source == "file":
        path.write_text(yaml.safe_dump({"model": {"num_layer": 6}}))
        overrides = []
    else:
        path.write_text(yaml.safe_dump({}))
        overrides = ["model.num_layer=6"]
    with pytest.raises(ConfigError, match=r"model\.num_layer: unknown key"):
        load_config(path, overrides)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["modle.num_layers=2"])


def test_bad_types_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_layers: expected an integer, got 'four'"):
        load_config(None, ["model.num_layers=four"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "gpt_7b.yaml", ["fpa.lambda0=0.25", "data.weights=[1,2]",
                                                "data.prefixes=[x,y]"])
    save_config(cfg, tmp_path / "saved" / "config.yaml")
    again = load_config(tmp_path / "saved" / "config.yaml")
    assert again == cfg


# ------------------------------------------------------------------------------------------ valid configs


def test_valid_config_layout(tokenizer, shards):
    layout = check(tokenizer, shards, ["parallel.tensor=2", "model.num_query_groups=2"], world_size=8)
    assert layout == ResolvedLayout(
        world_size=8, tensor_parallel=2, pipeline_parallel=1, data_parallel=4, num_microbatches=2,
        vocab_size=TOKENIZER_VOCAB, padded_vocab_size=256, ffn_hidden_size=256, max_position_embeddings=32,
        num_query_groups=2, kv_channels=16, tokenizer_vocab_size=TOKENIZER_VOCAB,
    )


def test_context_parallel_layout(tokenizer, shards):
    """World = TP x CP x PP x DP: CP ranks share one data-parallel replica's micro-batches."""
    layout = check(tokenizer, shards, ["parallel.tensor=2", "parallel.context=2"], world_size=8)
    assert (layout.context_parallel, layout.tensor_parallel, layout.data_parallel, layout.num_microbatches) == (
        2, 2, 2, 4)
    for impl in ("auto", "eager", "blockwise"):  # every CPU kernel runs across CP ranks
        check(tokenizer, shards, ["parallel.context=4", f"model.attention_impl={impl}"], world_size=4)
    check(tokenizer, shards, ["parallel.context=2", "model.seq_length=20"], world_size=2)  # 20 = 4 chunks of 5


def test_check_config_does_not_modify_the_config(tokenizer, shards):
    cfg = config_from_dict(base(tokenizer, shards))
    before = copy.deepcopy(cfg)
    check_config(cfg, 4)
    assert cfg == before and cfg.model.vocab_size is None and cfg.model.ffn_hidden_size is None


@pytest.mark.parametrize("vocab,tp,expected", [
    (50257, 1, 50304), (50257, 2, 50432), (50257, 8, 51200), (32000, 1, 32000), (32000, 4, 32256),
    (32000, 8, 32768), (60, 1, 128), (128, 1, 128), (129, 1, 256), (1, 4, 512),
])
def test_padded_vocab_size(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected
    assert expected % (128 * tp) == 0 and expected >= vocab and expected - vocab < 128 * tp


def test_padded_vocab_in_layout_follows_tensor_parallel(tokenizer, shards):
    for tp in (1, 2, 4):
        layout = check(tokenizer, shards, [f"parallel.tensor={tp}", "model.vocab_size=1000"], world_size=4)
        assert layout.vocab_size == 1000 and layout.padded_vocab_size == padded_vocab_size(1000, tp)
        assert layout.padded_vocab_size % (128 * tp) == 0


def test_num_microbatches(tokenizer, shards):
    layout = check(tokenizer, shards, ["train.micro_batch_size=1", "train.global_batch_size=24",
                                       "parallel.pipeline=2"], world_size=4)
    assert (layout.data_parallel, layout.num_microbatches) == (2, 12)


@pytest.mark.parametrize("stage,pipeline", [(1, 1), (1, 2), (2, 1)])
def test_supported_zero_stages(tokenizer, shards, stage, pipeline):
    check(tokenizer, shards, [f"optimizer.zero_stage={stage}", f"parallel.pipeline={pipeline}",
                              "parallel.tensor=2"], world_size=4)


def test_mock_data_needs_no_prefixes(tokenizer, shards):
    check(tokenizer, shards, ["data.mock=true", "data.prefixes=[]", "data.tokenizer=null",
                              "model.vocab_size=512"])


def test_rope_ignores_max_position_embeddings(tokenizer, shards):
    check(tokenizer, shards, ["model.position_embedding=rope", "model.max_position_embeddings=16"])


def _checkpoint_dir(path: Path, world_size: int, tensor: int, pipeline: int, complete: bool = True) -> Path:
    """What check_config reads of a checkpoint: its marker and layout.json (no weights are read before the
    layout is known to fit; the end-to-end test with real saves is in tests/training/test_checkpoint.py)."""
    import json

    path.mkdir(parents=True)
    layout = dict(world_size=world_size, tensor=tensor, pipeline=pipeline,
                  data=world_size // (tensor * pipeline), zero_stage=1, step=int(path.name.split("_")[-1]))
    (path / "layout.json").write_text(json.dumps(layout))
    if complete:
        (path / "complete").write_text(f"{layout['step']}\n")
    return path


def test_resume_needs_a_complete_checkpoint(tokenizer, shards, tmp_path):
    good = _checkpoint_dir(tmp_path / "iter_0000040", 4, 1, 1)
    check(tokenizer, shards, [f"checkpoint.resume={good}"])
    (tmp_path / "latest").write_text("iter_0000040\n")
    check(tokenizer, shards, [f"checkpoint.resume={tmp_path}"])  # a checkpoint root: its latest
    killed = _checkpoint_dir(tmp_path / "iter_0000050", 4, 1, 1, complete=False)
    for path in (killed, tmp_path / "empty", tmp_path / "missing"):
        if path.name == "empty":
            path.mkdir()
        with pytest.raises(ConfigError) as err:
            check(tokenizer, shards, [f"checkpoint.resume={path}"])
        assert f"checkpoint.resume='{path}' is not a complete checkpoint directory" in str(err.value)


def test_resume_auto_follows_latest_and_checks_its_layout(tokenizer, shards, tmp_path):
    _checkpoint_dir(tmp_path / "iter_0000040", 4, 1, 1)
    _checkpoint_dir(tmp_path / "iter_0000060", 4, 2, 1)  # newer by step, but not what latest names
    (tmp_path / "latest").write_text("iter_0000040\n")
    auto = ["checkpoint.resume=auto", f"checkpoint.dir={tmp_path}"]
    check(tokenizer, shards, auto)
    with pytest.raises(ConfigError) as err:
        check(tokenizer, shards, auto + ["parallel.tensor=2", "parallel.pipeline=2"])
    message = str(err.value)
    assert "iter_0000040" in message and "TP1 x PP1 x DP4 (4 ranks)" in message
    assert "TP2 x PP2 x DP1 (4 ranks)" in message and "fpa-reshard --checkpoint" in message
    assert "--tensor 2 --pipeline 2" in message


def test_bf16_on_cpu_is_allowed(tokenizer, shards):
    check(tokenizer, shards, ["model.dtype=bf16"])


def test_split_parsing():
    assert parse_split("98,1,1") == (98.0, 1.0, 1.0)
    assert parse_split("0.9, 0.1, 0") == (0.9, 0.1, 0.0)


# ------------------------------------------------------------------------------------------ each check

BAD = {
    # tensor / pipeline layout
    "heads_by_tp": (["model.num_attention_heads=6", "model.hidden_size=48", "parallel.tensor=4"], 4,
                    ["model.num_attention_heads=6", "parallel.tensor=4"]),
    "groups_by_tp": (["model.num_query_groups=2", "parallel.tensor=4"], 4,
                     ["model.num_query_groups=2", "parallel.tensor=4"]),
    "heads_by_groups": (["model.num_query_groups=3"], 4, ["model.num_attention_heads=4", "model.num_query_groups=3"]),
    "ffn_by_tp": (["model.ffn_hidden_size=130", "parallel.tensor=4"], 4,
                  ["model.ffn_hidden_size=130", "parallel.tensor=4"]),
    "layers_by_pp": (["model.num_layers=3", "parallel.pipeline=2"], 4, ["model.num_layers=3", "parallel.pipeline=2"]),
    "world_by_tp_pp": (["parallel.tensor=2", "parallel.pipeline=2"], 6, ["world_size=6", "parallel.tensor",
                                                                         "parallel.pipeline", "4"]),
    "world_zero": ([], 0, ["world_size=0"]),
    "tp_zero": (["parallel.tensor=0"], 4, ["parallel.tensor=0"]),
    "pp_zero": (["parallel.pipeline=0"], 4, ["parallel.pipeline=0"]),
    # context parallelism
    "cp_zero": (["parallel.context=0"], 4, ["parallel.context=0"]),
    "seq_by_2cp": (["parallel.context=3"], 6, ["model.seq_length=32", "2 * parallel.context = 2 * 3 = 6"]),
    "seq_by_2cp_tp_with_sp": (["model.seq_length=24", "parallel.context=2", "parallel.tensor=4",
                               "parallel.sequence_parallel=true"], 8,
                              ["model.seq_length=24", "2 * parallel.context * parallel.tensor = 2 * 2 * 4 = 16"]),
    "cp_attention_dropout": (["parallel.context=2", "model.attention_impl=eager", "model.attention_dropout=0.1"], 4,
                             ["model.attention_dropout=0.1", "parallel.context=2"]),
    "world_by_tp_cp": (["parallel.context=2", "parallel.tensor=2"], 6,
                       ["world_size=6", "parallel.tensor * parallel.context * parallel.pipeline", "= 4"]),
    # batch arithmetic
    "global_batch": (["train.global_batch_size=12", "train.micro_batch_size=4"], 2,
                     ["train.global_batch_size=12", "train.micro_batch_size", "data_parallel", "8"]),
    # model shape
    "hidden_by_heads": (["model.hidden_size=66"], 4, ["model.hidden_size=66", "model.num_attention_heads=4"]),
    "rope_odd_head_dim": (["model.hidden_size=12", "model.num_attention_heads=4",
                           "model.position_embedding=rope"], 4, ["model.position_embedding='rope'", "3"]),
    "seq_over_positions": (["model.position_embedding=learned", "model.max_position_embeddings=16"], 4,
                           ["model.seq_length=32", "model.max_position_embeddings=16"]),
    "seq_zero": (["model.seq_length=0"], 4, ["model.seq_length=0"]),
    "layers_zero": (["model.num_layers=0"], 4, ["model.num_layers=0"]),
    "hidden_zero": (["model.hidden_size=0"], 4, ["model.hidden_size=0"]),
    "heads_zero": (["model.num_attention_heads=0"], 4, ["model.num_attention_heads=0"]),
    "groups_zero": (["model.num_query_groups=0"], 4, ["model.num_query_groups=0"]),
    "ffn_zero": (["model.ffn_hidden_size=0"], 4, ["model.ffn_hidden_size=0"]),
    "block_zero": (["model.attention_block_size=0"], 4, ["model.attention_block_size=0"]),
    "dropout_one": (["model.hidden_dropout=1.0"], 4, ["model.hidden_dropout=1.0"]),
    "attn_dropout_negative": (["model.attention_dropout=-0.1"], 4, ["model.attention_dropout=-0.1"]),
    "init_std_zero": (["model.init_std=0"], 4, ["model.init_std=0"]),
    # enums
    "position_embedding": (["model.position_embedding=alibi"], 4, ["model.position_embedding='alibi'"]),
    "normalization": (["model.normalization=rmsnorm"], 4, ["model.normalization='rmsnorm'"]),
    "activation": (["model.activation=relu"], 4, ["model.activation='relu'"]),
    "recompute": (["model.recompute=some"], 4, ["model.recompute='some'"]),
    "dtype": (["model.dtype=fp16"], 4, ["model.dtype='fp16'"]),
    "attention_impl": (["model.attention_impl=flash"], 4, ["model.attention_impl='flash'"]),
    "blockwise_dropout": (["model.attention_impl=blockwise", "model.attention_dropout=0.1"], 4,
                          ["model.attention_dropout=0.1", "blockwise"]),
    "auto_dropout": (["model.attention_dropout=0.1"], 4,  # auto is the default
                     ["model.attention_dropout=0.1", "model.attention_impl='auto'", "model.attention_impl=eager"]),
    # ZeRO
    "zero3": (["optimizer.zero_stage=3"], 4, ["optimizer.zero_stage=3", "ZeRO-3 is not supported",
                                              "tensor-parallel", "pipeline"]),
    "zero2_pp": (["optimizer.zero_stage=2", "parallel.pipeline=2"], 4,
                 ["optimizer.zero_stage=2", "parallel.pipeline=2"]),
    "zero_unknown": (["optimizer.zero_stage=5"], 4, ["optimizer.zero_stage=5"]),
    "zero0": (["optimizer.zero_stage=0"], 4, ["optimizer.zero_stage=0", "not supported"]),
    "zero_negative": (["optimizer.zero_stage=-1"], 4, ["optimizer.zero_stage=-1"]),
    # optimizer
    "lr_below_min_lr": (["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"], 4,
                        ["optimizer.min_lr=0.001", "optimizer.lr=0.0001"]),
    "lr_zero": (["optimizer.lr=0", "optimizer.min_lr=0"], 4, ["optimizer.lr=0"]),
    "min_lr_negative": (["optimizer.min_lr=-1e-5"], 4, ["optimizer.min_lr=-1e-05"]),
    "warmup_negative": (["optimizer.warmup_steps=-1"], 4, ["optimizer.warmup_steps=-1"]),
    "decay_zero": (["optimizer.decay_steps=0"], 4, ["optimizer.decay_steps=0"]),
    "grad_clip_negative": (["optimizer.grad_clip=-1"], 4, ["optimizer.grad_clip=-1"]),
    "weight_decay_negative": (["optimizer.weight_decay=-0.1"], 4, ["optimizer.weight_decay=-0.1"]),
    "beta2_one": (["optimizer.beta2=1.0"], 4, ["optimizer.beta2=1.0"]),
    "eps_zero": (["optimizer.eps=0"], 4, ["optimizer.eps=0"]),
    # train
    "steps_zero": (["train.steps=0"], 4, ["train.steps=0"]),
    "micro_zero": (["train.micro_batch_size=0"], 4, ["train.micro_batch_size=0"]),
    "global_zero": (["train.global_batch_size=0"], 4, ["train.global_batch_size=0"]),
    "eval_interval_negative": (["train.eval_interval=-5"], 4, ["train.eval_interval=-5"]),
    "eval_iters_zero": (["train.eval_interval=10", "train.eval_iters=0"], 4, ["train.eval_iters=0"]),
    "seed_negative": (["train.seed=-1"], 4, ["train.seed=-1"]),
    "exit_interval_negative": (["train.exit_interval=-1"], 4, ["train.exit_interval=-1"]),
    # fpa
    "lambda0_negative": (["fpa.lambda0=-0.1"], 4, ["fpa.lambda0=-0.1"]),
    "gamma_zero": (["fpa.gamma=0"], 4, ["fpa.gamma=0"]),
    "gamma_above_one": (["fpa.gamma=1.5"], 4, ["fpa.gamma=1.5"]),
    "min_lambda_negative": (["fpa.min_lambda=-1"], 4, ["fpa.min_lambda=-1"]),
    "target": (["fpa.target=scores"], 4, ["fpa.target='scores'"]),
    "normalize": (["fpa.normalize=max"], 4, ["fpa.normalize='max'"]),
    # logging / checkpoint
    "log_interval_zero": (["logging.interval=0"], 4, ["logging.interval=0"]),
    "heatmap_interval_negative": (["logging.heatmap_interval=-1"], 4, ["logging.heatmap_interval=-1"]),
    "attention_stats_interval_negative": (["logging.attention_stats_interval=-1"], 4,
                                          ["logging.attention_stats_interval=-1"]),
    "qk_layernorm_not_bool": (["model.qk_layernorm=sometimes"], 4, ["model.qk_layernorm", "'sometimes'"]),
    "peak_tflops_zero": (["logging.peak_tflops=0"], 4, ["logging.peak_tflops=0"]),
    "checkpoint_interval_negative": (["checkpoint.interval=-1"], 4, ["checkpoint.interval=-1"]),
    "keep_last_zero": (["checkpoint.keep_last=0"], 4, ["checkpoint.keep_last=0"]),
    "resume_missing": (["checkpoint.resume=/no/such/checkpoint"], 4, ["checkpoint.resume='/no/such/checkpoint'"]),
    # data
    "split_two": (["data.split=99,1"], 4, ["data.split='99,1'"]),
    "split_negative": (["data.split='98,-1,3'"], 4, ["data.split='98,-1,3'"]),
    "split_zero_sum": (["data.split='0,0,0'"], 4, ["data.split='0,0,0'"]),
    "split_text": (["data.split=most,some,rest"], 4, ["data.split='most,some,rest'"]),
    "weights_length": (["data.weights=[1]"], 4, ["data.weights=[1]", "1 entries", "data.prefixes has 2"]),
    "weights_negative": (["data.weights=[1,-1]"], 4, ["data.weights=[1, -1]", "positive"]),
    "weights_zero": (["data.weights=[1,0]"], 4, ["data.weights=[1, 0]", "positive", "rejects a weight of 0"]),
    "weights_all_zero": (["data.weights=[0,0]"], 4, ["data.weights=[0, 0]", "positive"]),
    "eval_without_valid_split": (["train.eval_interval=10", "data.split=99,0,1"], 4,
                                 ["train.eval_interval=10", "data.split='99,0,1'", "validation split"]),
    "weights_text": (["data.weights=[a,1]"], 4, ["data.weights=['a', 1]"]),
    "prefixes_empty": (["data.prefixes=[]"], 4, ["data.prefixes=[]", "data.mock=true"]),
    # vocabulary
    "neither_vocab_nor_tokenizer": (["data.tokenizer=null"], 4, ["model.vocab_size=None", "data.tokenizer=None"]),
    "vocab_below_tokenizer": (["model.vocab_size=50"], 4, ["model.vocab_size=50", "60 pieces", "data.tokenizer="]),
    "vocab_zero": (["model.vocab_size=0"], 4, ["model.vocab_size=0"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_rejected(tokenizer, shards, name):
    overrides, world_size, fragments = BAD[name]
    with pytest.raises(ConfigError) as err:
        check(tokenizer, shards, overrides, world_size)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_data_prefix_files_must_exist(tokenizer, shards, tmp_path, missing):
    prefix = tmp_path / "partial_00000"
    for suffix in {".bin", ".idx"} - {missing}:
        Path(f"{prefix}{suffix}").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        check(tokenizer, shards, [f"data.prefixes=[{shards[0]},{prefix}]"])
    assert f"data.prefixes[1]='{prefix}'" in str(err.value)
    assert f"{prefix}{missing} does not exist" in str(err.value)


def test_every_split_gets_a_document_of_every_prefix(tokenizer, shards, tmp_path):
    small = write_dataset(str(tmp_path / "small"), 20)  # 98,1,1 of 20 documents: validation [19.6, 19.8) -> none
    with pytest.raises(ConfigError) as err:
        check(tokenizer, shards, [f"data.prefixes=[{shards[0]},{small}]"])
    message = str(err.value)
    assert f"data.prefixes[1]='{small}' has 20 documents" in message and "validation split" in message
    assert "data.split='98,1,1'" in message
    check(tokenizer, shards, [f"data.prefixes=[{shards[0]},{small}]", "data.split=80,10,10"])
    garbage = tmp_path / "garbage"
    Path(f"{garbage}.bin").write_bytes(b"")
    Path(f"{garbage}.idx").write_bytes(b"not an index")
    with pytest.raises(ConfigError, match=rf"{garbage}\.idx is not a Megatron-core index file"):
        check(tokenizer, shards, [f"data.prefixes=[{garbage}]"])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tokenizer) -> Path:
    """A real `fpa-prep encode` (+ merge) with the `tokenizer` fixture: its manifest records the tokenizer."""
    from data_prep.encode import EncodeOptions, run_encode
    from data_prep.merge import merge_encode_dir

    root = tmp_path_factory.mktemp("encoded")
    words = ["alpha", "beta", "gamma", "delta", "tensor", "pipeline"]
    (root / "in.jsonl").write_text("".join(f'{{"text": "{words[i % 6]} {words[i % 5]} {i}"}}\n' for i in range(300)))
    _, status = run_encode(EncodeOptions(inputs=[str(root / "in.jsonl")], tokenizer=tokenizer,
                                         out_dir=str(root / "out"), name="corpus", num_shards=2, workers=1,
                                         progress=False))
    assert status == 0
    merge_encode_dir(str(root / "out"))
    return root / "out"


def test_data_must_be_encoded_with_the_configured_tokenizer(tokenizer, shards, encoded, tmp_path):
    import hashlib
    import shutil

    import sentencepiece as spm

    merged, shard = encoded / "corpus", encoded / "corpus_00001"
    check(tokenizer, shards, [f"data.prefixes=[{merged},{shard}]", "train.eval_interval=0"])
    other = tmp_path / "other.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["other words entirely", "and more of them"] * 50),
                                   model_prefix=str(other.with_suffix("")), vocab_size=40, model_type="bpe",
                                   minloglevel=2)
    for prefix, index in ((merged, 1), (shard, 1)):
        with pytest.raises(ConfigError) as err:
            check(tokenizer, shards, [f"data.prefixes=[{shards[0]},{prefix}]", f"data.tokenizer={other}",
                                      "train.eval_interval=0"])
        message = str(err.value)
        assert f"data.prefixes[{index}]='{prefix}' was encoded with the tokenizer '{tokenizer}'" in message
        assert hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()[:12] in message
        assert f"data.tokenizer='{other}'" in message
        assert hashlib.sha256(other.read_bytes()).hexdigest()[:12] in message
    # the same model under another path is the same tokenizer; data without a manifest is not checked
    copy_path = tmp_path / "copy.model"
    shutil.copy(tokenizer, copy_path)
    check(tokenizer, shards, [f"data.prefixes=[{merged}]", f"data.tokenizer={copy_path}", "train.eval_interval=0"])
    check(tokenizer, shards, [f"data.tokenizer={other}"])


def test_tokenizer_must_exist(tokenizer, shards, tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(ConfigError, match=rf"data\.tokenizer='{missing}' does not exist"):
        check(tokenizer, shards, [f"data.tokenizer={missing}"])


def test_tokenizer_must_load(tokenizer, shards, tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ConfigError) as err:
        check(tokenizer, shards, [f"data.tokenizer={garbage}"])
    assert f"data.tokenizer='{garbage}'" in str(err.value) and "sentencepiece" in str(err.value)


def test_vocab_from_tokenizer_and_explicit_vocab(tokenizer, shards):
    assert check(tokenizer, shards).vocab_size == TOKENIZER_VOCAB
    layout = check(tokenizer, shards, ["model.vocab_size=200"])
    assert (layout.vocab_size, layout.padded_vocab_size, layout.tokenizer_vocab_size) == (200, 256, TOKENIZER_VOCAB)


@pytest.mark.parametrize("impl", ["auto", "eager", "blockwise"])
def test_attention_impls_on_cpu(tokenizer, shards, impl):
    check(tokenizer, shards, [f"model.attention_impl={impl}"])
    if impl == "eager":  # the only path with attention dropout
        check(tokenizer, shards, [f"model.attention_impl={impl}", "model.attention_dropout=0.1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_impl_needs_cuda(tokenizer, shards):
    with pytest.raises(ConfigError, match=r"model.attention_impl='triton' needs a CUDA device"):
        check(tokenizer, shards, ["model.attention_impl=triton"])


def test_auto_is_the_default_attention_everywhere():
    assert RunConfig().model.attention_impl == "auto"
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["model"]["attention_impl"] == "auto", path.name


# ------------------------------------------------------------------------------------------ the presets

PRESETS = {"gpt_125m.yaml": 8, "gpt_1.3b.yaml": 8, "gpt_1.3b_32k.yaml": 8, "gpt_7b.yaml": 8}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gpu_presets_pass_the_checks(name):
    cfg = load_config(CONFIGS / name, ["data.mock=true", "data.tokenizer=null"])
    assert cfg.model.dtype == "bf16" and cfg.fpa.normalize == "mean" and cfg.fpa.enabled
    layout = check_config(cfg, PRESETS[name])
    assert layout.num_microbatches >= 1
    check_config(cfg, 4 * PRESETS[name])  # four nodes: more data parallelism
    # the placeholder data paths are really checked without data.mock
    with pytest.raises(ConfigError, match=r"data\.prefixes\[0\]"):
        check_config(load_config(CONFIGS / name, ["data.tokenizer=null"]), PRESETS[name])


def test_gpu_preset_layouts():
    layouts = {}
    for name, world in PRESETS.items():
        cfg = load_config(CONFIGS / name, ["data.mock=true", "data.tokenizer=null"])
        layouts[name] = (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.optimizer.zero_stage,
                         check_config(cfg, world).data_parallel)
    assert layouts == {"gpt_125m.yaml": (1, 1, 1, 8), "gpt_1.3b.yaml": (1, 1, 1, 8), "gpt_1.3b_32k.yaml": (1, 1, 1, 2),
                       "gpt_7b.yaml": (4, 1, 1, 2)}
    long = load_config(CONFIGS / "gpt_1.3b_32k.yaml", ["data.mock=true", "data.tokenizer=null"])
    assert (long.parallel.context, long.model.seq_length, long.model.position_embedding) == (4, 32768, "rope")
    assert check_config(long, 8).num_microbatches == 32


def test_demo_config_on_two_cpu_ranks(tokenizer):
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["data.mock=true", f"data.tokenizer={tokenizer}"])
    assert cfg.model.dtype == "fp32" and cfg.logging.run_name == "demo_cpu"
    layout = check_config(cfg, 2)
    assert (layout.data_parallel, layout.num_microbatches) == (2, 1)
    assert layout.vocab_size == TOKENIZER_VOCAB  # taken from the tokenizer
    assert cfg.data.tokenizer and cfg.data.prefixes  # placeholders present
    raw = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    assert raw["data"]["tokenizer"] == "data/demo/tokenizer/spm.model"
    assert all(p.startswith("data/demo/") for p in raw["data"]["prefixes"])


# ------------------------------------------------------------------------------------------ string fields keep their text

TEXT_VALUES = ["off", "no", "yes", "on", "1_000", "1e3", "0x10", "2024-01-01", "12:30", "True", "None", "007"]


@pytest.mark.parametrize("text", TEXT_VALUES)
def test_a_string_field_keeps_its_text_in_files_and_overrides(tmp_path, text):
    from fpa_megatron.config import load_config, save_config

    path = tmp_path / "run.yaml"
    path.write_text(f"logging:\n  run_name: {text}\n  dir: {text}\ndata:\n  prefixes: [{text}, b]\n")
    cfg = load_config(path)
    assert (cfg.logging.run_name, cfg.logging.dir, cfg.data.prefixes) == (text, text, [text, "b"])
    overridden = load_config(None, [f"logging.run_name={text}", f"data.split={text}", f"data.prefixes={text},b"])
    assert (overridden.logging.run_name, overridden.data.split, overridden.data.prefixes) == (text, text, [text, "b"])
    save_config(cfg, tmp_path / "saved.yaml")  # written back and read again: the same text
    assert load_config(tmp_path / "saved.yaml").logging.run_name == text


def test_typed_fields_still_read_yaml_values_and_null_is_none_for_optional_strings(tmp_path):
    from fpa_megatron.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("logging: {run_name: null, interval: 1_000, tensorboard: off}\ntrain: {steps: 1e3}\n"
                    "optimizer: {lr: 3e-4}\ndata: {weights: [1, 2.5], tokenizer: ~}\n")
    cfg = load_config(path)
    assert cfg.logging.run_name == "run"  # null: the file's stem
    assert (cfg.logging.interval, cfg.logging.tensorboard, cfg.train.steps) == (1000, False, 1000)
    assert cfg.optimizer.lr == 3e-4 and cfg.data.weights == [1, 2.5] and cfg.data.tokenizer is None
    over = load_config(None, ["logging.run_name=~", "data.tokenizer=null", "logging.dir='null'", "model.dtype=off"])
    assert (over.logging.run_name, over.data.tokenizer, over.logging.dir, over.model.dtype) == (None, None, "null", "off")
    with pytest.raises(ConfigError, match="logging.interval: expected an integer, got False"):
        load_config(None, ["logging.interval=off"])


def test_document_mask_is_checked_before_any_process_group(tokenizer, shards):
    """data.document_mask: a boolean, read from the command line and refused otherwise; on, the layout is the
    same as without it (every kernel and layout masks documents)."""
    with pytest.raises(ConfigError, match=r"data\.document_mask: expected true or false, got 'maybe'"):
        load_config(None, ["data.document_mask=maybe"])
    values = base(tokenizer, shards)
    values["data"]["document_mask"] = 2
    with pytest.raises(ConfigError, match=r"data\.document_mask: expected true or false, got 2"):
        config_from_dict(values, [])
    on = check(tokenizer, shards, ["data.document_mask=true", "parallel.context=2", "parallel.tensor=2"])
    off = check(tokenizer, shards, ["parallel.context=2", "parallel.tensor=2"])
    assert on == off
