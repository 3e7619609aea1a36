"""The model tools stream (issue 27): `fpa-import`, `fpa-export`, `fpa-reshard` and `fpa-ckpt verify`, run one after
the other in a fresh process on a LLaMA with 200 MB of bf16 weights stored in small files, each raise the memory
that process allocates by at most the largest file the step writes plus the largest file it reads, plus a fixed
margin: far less than the model, which a tool that loaded it, or built all its output before writing, would add.
benchmarks/tooling_memory.py measures each tool in its own process at 1.1B parameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fpa_megatron.testing import run_measured

MIB = 1 << 20
MARGIN = 64 * MIB  # allocator slack, a transformers model on the meta device, the tensors being converted
# In a fresh process: run the tools once on a tiny model (the modules they import on first use), then on the
# model while a thread samples the process's anonymous resident memory
# (resident minus file-backed pages, every 2 ms: what the tool allocated; library pages the kernel evicts and
# faults in again on a busy machine do not count) and note how far each step raised it.
STEPS = """
import json, resource, sys, threading, time
import deepspeed, transformers, safetensors
from fpa_megatron.importer.cli import main as fpa_import
from fpa_megatron.export.cli import main as fpa_export
from fpa_megatron.checkpoint.cli import ckpt_main, reshard_main
PAGE = resource.getpagesize()
def anonymous():
    with open("/proc/self/statm") as f:
        _, resident, shared = map(int, f.read().split()[:3])
    return (resident - shared) * PAGE
high = [0]
def sample():
    while True:
        high[0] = max(high[0], anonymous())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
def step(name, run):
    high[0] = before = anonymous()
    assert run() == 0, name
    time.sleep(0.01)
    added[name] = high[0] - before
def tools(hf, imported, exported, resharded):
    return {"import": lambda: fpa_import(["hf", "--model", hf, "--out", imported, "--tensor", "2", "--pipeline", "4",
                                          "--no-verify"]),
            "export": lambda: fpa_export(["hf", "--checkpoint", imported, "--out", exported, "--no-verify",
                                          "--shard-mb", "16"]),
            "reshard": lambda: reshard_main(["--checkpoint", imported, "--tensor", "2", "--pipeline", "2",
                                             "--data-parallel", "2", "--out", resharded]),
            "verify": lambda: ckpt_main(["verify", resharded])}
added = {}
for name, run in tools(*sys.argv[1:5]).items():  # a tiny model first: what the first use imports does not count
    assert run() == 0, name
for name, run in tools(*sys.argv[5:9]).items():
    step(name, run)
print(json.dumps(added))
"""


def save_llama(out: Path, hidden: int = 1024, ffn: int = 2816, vocab: int = 8000) -> int:
    """A random LLaMA (8 x 1024, ffn 2816, 4 key/value groups, vocabulary 8000: 100M parameters), bf16 safetensors
    in files of at most 16 MB; returns the bytes of weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=8, num_attention_heads=16,
                                      num_key_value_heads=4, intermediate_size=ffn, max_position_embeddings=64,
                                      tie_word_embeddings=False, dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="16MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def largest(path: Path, pattern: str = "*") -> int:
    return max((p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file()), default=0)


def test_import_export_reshard_and_verify_hold_their_largest_files_not_the_model(tmp_path):
    hf, imported, exported, resharded = (tmp_path / name for name in ("hf", "imported", "exported", "tp2pp2dp2"))
    weights = save_llama(hf)
    save_llama(tmp_path / "tiny" / "hf", hidden=64, ffn=128, vocab=300)
    tiny = [str(tmp_path / "tiny" / name) for name in ("hf", "imported", "exported", "resharded")]
    run = run_measured([sys.executable, "-c", STEPS, *tiny, str(hf), str(imported), str(exported), str(resharded)])
    assert run.returncode == 0, run.output[-3000:]
    added = json.loads(run.output.strip().splitlines()[-1])
    files = {"import": (hf, "*.safetensors", imported), "export": (imported, "mp_rank_*", exported),
             "reshard": (imported, "mp_rank_*", resharded), "verify": (resharded, "*", tmp_path / "none")}
    for step, (read, pattern, written) in files.items():
        bound = largest(read, pattern) + largest(written) + MARGIN
        print(f"{step}: {added[step] / MIB:.0f} MiB added (bound {bound / MIB:.0f} MiB)")
        assert added[step] <= bound, (step, {k: v // MIB for k, v in added.items()}, bound // MIB)
        if step == "import":  # that bound tells streaming from loading the model ...
            assert bound < weights
        if step == "reshard":
            assert bound < 7 * weights  # ... and from building the complete checkpoint (14 bytes a parameter) in memory
    assert not list(imported.glob("*/*optim_states.pt"))  # the import: weights only
    assert len(list(resharded.glob("*/*optim_states.pt"))) == 8  # the reshard: a complete checkpoint
    assert len(list(exported.glob("model-*.safetensors"))) > 1 and (exported / "model.safetensors.index.json").is_file()

    from safetensors import safe_open

    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    state, compared = read_model_checkpoint(resharded).state_dict, 0  # the tensors came through (exactness: elsewhere)
    for file in hf.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in (k for k in f.keys() if k.endswith("mlp.down_proj.weight")):
                layer = key.split(".")[2]
                assert torch.equal(state[f"decoder.layers.{layer}.mlp.linear_fc2.weight"], f.get_tensor(key))
                compared += 1
    assert compared == 8
