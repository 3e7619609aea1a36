"""Checkpoints saved by the real trainer at TP2 x PP2 (4 gloo ranks), one per model family, shared by the
checkpoint-reader, export, generation and evaluation tests (built once per test session).

The data is real: a small sentencepiece tokenizer (the fpa-prep defaults) trained on a slice of the built-in
corpus, encoded and merged into one indexed prefix. After training, the same 4 ranks rebuild each model, load
the checkpoint through DeepSpeed and report what the live model holds: its global weights (`gather_global`),
its logits on a fixed batch (through the 1F1B pipeline) and the (model-parallel, tensor, pipeline) rank of
every process.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEQ, MICRO, GLOBAL, STEPS, EVAL_ITERS, VOCAB = 32, 2, 4, 3, 2, 400
FAMILIES = {
    # GPT-2: learned positions, LayerNorm, exact GeLU, tied embeddings
    "gpt2": {"position_embedding": "learned", "normalization": "LayerNorm", "activation": "gelu",
             "tie_embeddings": True},
    # GPT-NeoX: rotary, LayerNorm, GeLU, tied embeddings
    "neox": {"position_embedding": "rope", "normalization": "LayerNorm", "activation": "gelu",
             "tie_embeddings": True},
    # LLaMA: rotary, RMSNorm, SwiGLU, grouped-query attention (4 heads, 2 groups), untied output layer
    "llama": {"position_embedding": "rope", "normalization": "RMSNorm", "activation": "swiglu",
              "num_query_groups": 2, "ffn_hidden_size": 96, "tie_embeddings": False},
}
TEXTS = [  # what the tokenizer tests encode: spaces, digits, newlines, tabs, unicode, unseen characters (bytes)
    "def f(x):\n    return x + 1\n",
    "  leading spaces, trailing spaces  ",
    "digits 1234567890 and 3.14159, 2**10 = 1024",
    "\n\nblank lines\n\n\n",
    "tabs\tand\ttabs",
    "Grüße aus Köln, naïve café; Ελληνικά; русский",
    "unseen: 日本語 😀 \U0001d518\U0001d52b ☃",
    "",
    " ",
    "</s> is the EOD piece written as text",
]


def make_data(root: Path) -> dict:
    """A tokenizer (vocabulary 400, byte fallback) and one merged indexed prefix, like `fpa-prep` makes."""
    import json

    from data_prep.builtin_corpus import gather
    from data_prep.encode import EncodeOptions, run_encode
    from data_prep.merge import merge_encode_dir
    from data_prep.tokenizer import train_tokenizer

    docs = [d["text"] for d in gather(1 << 17)] + TEXTS[:-1]
    train_tokenizer(docs, str(root / "tok"), vocab_size=VOCAB, sample_size=5000, seed=1, num_threads=1,
                    character_coverage=0.995)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    manifest, status = run_encode(EncodeOptions(inputs=[str(corpus)], tokenizer=str(root / "tok.model"),
                                                out_dir=str(root / "shards"), name="corpus", num_shards=1,
                                                workers=1, progress=False))
    assert status == 0, manifest
    merge_encode_dir(str(root / "shards"))
    return {"tokenizer": str(root / "tok.model"), "prefix": str(root / "shards" / "corpus"),
            "corpus": str(corpus)}


def family_values(family: str, data: dict, run_dir: Path) -> dict:
    return {
        # init_std 0.2 (not 0.02): sharp attention, so a wrong head order or rotary would change the logits
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ, "init_std": 0.2,
                  **FAMILIES[family]},
        "parallel": {"tensor": 2, "pipeline": 2},
        "fpa": {"lambda0": 0.05, "gamma": 0.9},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "zero_stage": 1},
        "data": {"prefixes": [data["prefix"]], "tokenizer": data["tokenizer"], "split": "80,10,10"},
        "train": {"steps": STEPS, "micro_batch_size": MICRO, "global_batch_size": GLOBAL, "seed": 5,
                  "eval_interval": STEPS, "eval_iters": EVAL_ITERS},
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "resume": "none"},
        "logging": {"dir": str(run_dir.parent), "run_name": run_dir.name, "interval": 1, "tensorboard": False},
    }


def probe_tokens() -> torch.Tensor:
    """A fixed [MICRO, SEQ] batch of ids below the tokenizer's vocabulary."""
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(11))


def _pipeline_logits(model, tokens: torch.Tensor):
    """Full-vocabulary logits [b, s, padded vocab] of `tokens` on the last stage (None elsewhere), through
    Megatron's forward-only pipeline schedule and a gather over the tensor-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, module):
        batch = next(data_iterator)
        return module(batch, torch.arange(SEQ).expand_as(batch), None), None

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=model,
                                              num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO,
                                              forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = outputs[0].contiguous()
    pieces = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(pieces, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)


def train_and_probe(runs: dict) -> dict:
    """On each of 4 ranks: train every run, then load its checkpoint through DeepSpeed and probe the model."""
    from megatron.core import parallel_state

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import MegatronMPU, init_model_parallel
    from fpa_megatron.parallel.weights import gather_global
    from fpa_megatron.checkpoint.checkpointer import Checkpointer
    from fpa_megatron.checkpoint.lineage import complete_checkpoints
    from fpa_megatron.training.optimizer import build_engine
    from fpa_megatron.training.trainer import train

    rank = torch.distributed.get_rank()
    out = {}
    for name, values in runs.items():
        cfg = config_from_dict(values)
        history = train(cfg)
        layout = check_config(cfg, 4)
        init_model_parallel(2, 2, cfg.train.seed + 1)  # a fresh model: its weights come only from the file
        penalty = make_penalty(cfg.model, cfg.fpa)
        model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size)
        engine = build_engine(model, cfg.optimizer, cfg.model.dtype, MICRO, layout.num_microbatches)
        (path,) = complete_checkpoints(Path(cfg.checkpoint.dir))
        Checkpointer(cfg, root=cfg.checkpoint.dir).load(path, engine)
        params = dict(model.named_parameters())
        weights = gather_global(model, {n: p.detach() for n, p in params.items()})
        mpu = MegatronMPU()
        out[name] = {
            "history": history,
            "checkpoint": str(path),
            "weights": weights if rank == 0 else None,
            "logits": _pipeline_logits(model, probe_tokens()),
            "ranks": (mpu.get_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_pipeline_model_parallel_rank()),
            # Megatron's own split attributes, to check the offline name table against
            "split_dims": {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                           for n, p in params.items()},
        }
    return out


def build(root: Path) -> dict:
    """{family: {history, checkpoint, weights, logits, ranks per rank, split_dims}} plus the data paths."""
    from fpa_megatron.testing import run_distributed

    data = make_data(root)
    runs = {name: family_values(name, data, root / name) for name in FAMILIES}
    per_rank = run_distributed(train_and_probe, 4, runs, timeout_s=600)
    result = {}
    for name in FAMILIES:
        result[name] = {
            **per_rank[0][name],
            "values": runs[name],
            "logits": next(r[name]["logits"] for r in per_rank if r[name]["logits"] is not None),
            "ranks": [r[name]["ranks"] for r in per_rank],
            "split_dims": [r[name]["split_dims"] for r in per_rank],
        }
    return {"data": data, "runs": result}


_CACHE: dict = {}


def trained_runs(tmp_path_factory) -> dict:
    """The session's runs (built on first use; every test module shares them)."""
    if "runs" not in _CACHE:
        _CACHE["runs"] = build(tmp_path_factory.mktemp("trained_runs"))
    return _CACHE["runs"]


def exported(tmp_path_factory, family: str) -> tuple[Path, str, int]:
    """`fpa-export hf` of a family's checkpoint (once per session): (directory, printed output, exit status)."""
    import contextlib
    import io

    from fpa_megatron.export.cli import main

    key = f"export_{family}"
    if key not in _CACHE:
        run = trained_runs(tmp_path_factory)["runs"][family]
        out_dir = tmp_path_factory.mktemp(f"hf_{family}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(["hf", "--checkpoint", run["checkpoint"], "--out", str(out_dir), "--overwrite"])
        _CACHE[key] = (out_dir, printed.getvalue(), status)
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------------------
# one small run on a Hugging Face tokenizer: a byte-level BPE tokenizer.json trained by `fpa-prep tokenizer`

BPE_VOCAB = 300
BPE_TEXTS = TEXTS + [  # code, whitespace runs, bytes never seen in training, the EOD token written as text
    "class A:\n\tdef __init__(self):\n\t\tself.x = {'k': [1, 2]}  # ok\n",
    "a  b   c    d\t\t\te\n\n\n\nf \r\n g",
    "\x00\x01\x7f \u00ad\u200b\ufeff \U0010fffd \u0300\u0301 ﷺ",
    "text <|endoftext|> more text",
]


def _train_only(values: dict) -> list:
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return train(config_from_dict(values))


def bytelevel_run(tmp_path_factory) -> dict:
    """fpa-prep tokenizer --type bpe-bytelevel -> encode -> merge -> a GPT-2 trained 3 steps at TP2 (2 gloo ranks)
    -> fpa-export hf (once per session): {tokenizer, corpus, prefix, shards, values, checkpoint, export, history}."""
    if "bytelevel" in _CACHE:
        return _CACHE["bytelevel"]
    import contextlib
    import io
    import json

    from data_prep.builtin_corpus import gather
    from data_prep.cli import main as prep
    from fpa_megatron.export.cli import main as export
    from fpa_megatron.testing import run_distributed

    root = tmp_path_factory.mktemp("bytelevel_run")
    docs = [d["text"] for d in gather(1 << 16)] + [t for t in BPE_TEXTS if t.strip()]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        assert prep(["tokenizer", "--type", "bpe-bytelevel", "-i", str(corpus), "--out", str(root / "tok"),
                     "--vocab-size", str(BPE_VOCAB), "--sample-size", "4000", "--seed", "1"]) == 0
        assert prep(["encode", "-i", str(corpus), "--tokenizer", str(root / "tok"), "--out-dir", str(root / "shards"),
                     "--name", "corpus", "--num-shards", "1", "--workers", "1", "--no-progress"]) == 0
        assert prep(["merge", str(root / "shards")]) == 0
    run_dir = root / "run"
    values = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ, "init_std": 0.2,
                  **FAMILIES["gpt2"]},
        "parallel": {"tensor": 2, "pipeline": 1},
        "fpa": {"lambda0": 0.05, "gamma": 0.9},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "zero_stage": 1},
        "data": {"prefixes": [str(root / "shards" / "corpus")], "tokenizer": str(root / "tok"), "split": "90,5,5"},
        "train": {"steps": STEPS, "micro_batch_size": MICRO, "global_batch_size": GLOBAL, "seed": 5,
                  "eval_interval": 0},
        "checkpoint": {"dir": str(run_dir / "checkpoints"), "resume": "none"},
        "logging": {"dir": str(root), "run_name": "run", "interval": 1, "tensorboard": False},
    }
    history = run_distributed(_train_only, 2, values, timeout_s=600)[0]
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("iter_*"))
    out_dir = root / "hf"
    with quiet:
        assert export(["hf", "--checkpoint", str(checkpoint), "--out", str(out_dir)]) == 0
    _CACHE["bytelevel"] = {"tokenizer": str(root / "tok" / "tokenizer.json"), "tokenizer_dir": str(root / "tok"),
                           "corpus": str(corpus), "docs": docs, "prefix": str(root / "shards" / "corpus"),
                           "shards": str(root / "shards"), "values": values, "checkpoint": str(checkpoint),
                           "export": str(out_dir), "history": history}
    return _CACHE["bytelevel"]
