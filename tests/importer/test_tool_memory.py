"""The model tools stream (issue 27): `fpa-import`, `fpa-export`, `fpa-reshard` and `fpa-ckpt verify`, each run as
its own process on a LLaMA with ~160 MB of bf16 weights stored in small files, hold at most the largest file they
write plus the largest file they read (plus a fixed margin) above what importing their code costs, which is far
less than the model: a tool that loaded the model, or built all its output before writing, would exceed it.
Peak RSS is the kernel's (wait4's ru_maxrss of the tool's process); benchmarks/tooling_memory.py measures the
same at 1.1B parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fpa_megatron.testing import run_measured

MIB = 1 << 20
MARGIN = 128 * MIB  # allocator slack, the transformers model on the meta device, one tensor being converted
PY = sys.executable
# what every tool imports before it reads a byte: the baseline the margin is counted from
BASELINE = ("import deepspeed, transformers, safetensors; import fpa_megatron.importer.hf, fpa_megatron.export.hf, "
            "fpa_megatron.export.verify, fpa_megatron.checkpoint.reshard")


def save_llama(out: Path) -> int:
    """A random LLaMA (6 x 1024, ffn 2816, 4 key/value groups, vocabulary 8000: 79M parameters), bf16 safetensors in
    files of at most 32 MB; returns the bytes of weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8000, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                                      num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=64,
                                      tie_word_embeddings=False, dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="32MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def largest(path: Path, pattern: str = "*") -> int:
    return max((p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file()), default=0)


def test_import_export_reshard_and_verify_hold_their_largest_files_not_the_model(tmp_path):
    model_dir, imported, exported, resharded = (tmp_path / name for name in ("hf", "imported", "exported", "tp1pp2"))
    weights = save_llama(model_dir)
    baseline = run_measured([PY, "-c", BASELINE])
    assert baseline.returncode == 0, baseline.output
    steps = [
        ("import", [PY, "-m", "fpa_megatron.importer.cli", "hf", "--model", str(model_dir), "--out", str(imported),
                    "--tensor", "2", "--pipeline", "2", "--no-verify"], model_dir, "*.safetensors", imported),
        ("export", [PY, "-m", "fpa_megatron.export.cli", "hf", "--checkpoint", str(imported), "--out",
                    str(exported), "--no-verify", "--shard-mb", "32"], imported, "mp_rank_*", exported),
        ("reshard", [PY, "-c", "import sys; from fpa_megatron.checkpoint.cli import reshard_main; "
                               "sys.exit(reshard_main())", "--checkpoint", str(imported), "--tensor", "1",
                     "--pipeline", "2", "--data-parallel", "2", "--out", str(resharded)],
         imported, "mp_rank_*", resharded),
        ("verify", [PY, "-c", "import sys; from fpa_megatron.checkpoint.cli import ckpt_main; sys.exit(ckpt_main())",
                    "verify", str(resharded)], resharded, "*", tmp_path / "none"),
    ]
    seen = {}
    for name, argv, read, pattern, written in steps:
        run = run_measured(argv)
        assert run.returncode == 0, (name, run.output[-3000:])
        bound = largest(read, pattern) + largest(written) + MARGIN
        seen[name] = (run.peak_rss - baseline.peak_rss) / MIB, bound / MIB
        assert run.peak_rss - baseline.peak_rss <= bound, (name, seen)
    # the bound tells streaming from loading: below the model's weights for the tools that convert them, and below
    # the complete checkpoint (weights + fp32 master + AdamW moments: 14 bytes a parameter) for the reshard
    assert largest(model_dir, "*.safetensors") + largest(imported) + MARGIN < weights
    assert largest(imported, "mp_rank_*") + largest(resharded) + MARGIN < 7 * weights
    assert sorted(p.name for p in (imported / "iter_0000000").glob("*optim_states.pt")) == []  # weights only
    assert len(list((resharded / "iter_0000000").glob("*optim_states.pt"))) == 4  # a complete checkpoint
    assert len(list(exported.glob("model-*.safetensors"))) > 1 and (exported / "model.safetensors.index.json").is_file()
    from safetensors import safe_open

    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    state, compared = read_model_checkpoint(imported).state_dict, 0  # the tensors came through (exactness: elsewhere)
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in (k for k in f.keys() if k.endswith("mlp.down_proj.weight")):
                assert torch.equal(state[f"decoder.layers.{key.split('.')[2]}.mlp.linear_fc2.weight"], f.get_tensor(key))
                compared += 1
    assert compared == 6
    print({name: f"{used:.0f} MiB above the baseline (bound {bound:.0f} MiB)" for name, (used, bound) in seen.items()})
