"""What the model tools hold in memory (issue 27): import, export, reshard and verify of a transformers LLaMA, each
run as a child process, against the streaming bound.

    python benchmarks/tooling_memory.py [--models small,tinyllama] [--dir DIR] [--no-checked]

For each model (random weights made with transformers, no download; bf16 safetensors, as TinyLlama ships):
`fpa-import hf --tensor 2 --pipeline 2` with --no-verify (the streaming write) and with its self-check,
`fpa-export hf` of that import likewise, `fpa-reshard` of it to TP1 x PP1 x DP1 (a complete checkpoint: the
weights plus a fresh AdamW state), and `fpa-ckpt verify` of the result. Per step: wall time, peak RSS (the
kernel's ru_maxrss of the tool's process, `fpa_megatron.testing.run_measured`; every tool is one process, mapped
file pages count as they are touched), bytes written, the largest file read and written, and the bound:
  streaming steps: largest file written + largest file read + 1 GiB (whatever the model's size);
  self-checks:     4 bytes per parameter (one float32 model) + largest file read + 1 GiB.
`small` (6 x 1024) next to `tinyllama` (22 x 2048, 32 heads, 4 key/value groups, ffn 5632, vocabulary 32000:
1,100,048,384 parameters) shows that the memory follows the files, not the model. Prints `[met]` / `[MISSED]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from fpa_megatron.testing import run_measured

GIB = 1 << 30
LLAMA = dict(num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
MODELS = {
    "small": dict(LLAMA, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, intermediate_size=2816),
    "tinyllama": dict(LLAMA, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, intermediate_size=5632),
}
PY = sys.executable
IMPORT = [PY, "-m", "fpa_megatron.importer.cli", "hf"]
EXPORT = [PY, "-m", "fpa_megatron.export.cli", "hf"]
RESHARD = [PY, "-c", "import sys; from fpa_megatron.checkpoint.cli import reshard_main; sys.exit(reshard_main())"]
VERIFY = [PY, "-c", "import sys; from fpa_megatron.checkpoint.cli import ckpt_main; sys.exit(ckpt_main())", "verify"]


def make_model(name: str, out: str) -> None:
    """A random LLaMA of shape `name`, saved in bf16 (in this process: run it as a child)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODELS[name], dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    print(sum(p.numel() for p in model.parameters()))


def files(path: Path) -> list[Path]:
    return [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).exists() else []


def largest(path: Path, pattern: str = "*") -> int:
    return max((p.stat().st_size for p in files(path) if p.match(pattern)), default=0)


def measure(label: str, argv: list[str], read: Path, read_pattern: str, written: Path, bound_extra: int = 0,
            rows: list = None) -> bool:
    run = run_measured(argv)
    if run.returncode != 0:
        print(run.output[-3000:])
        raise SystemExit(f"{label}: exit status {run.returncode}")
    big_read, big_written = largest(read, read_pattern), largest(written)
    total = sum(p.stat().st_size for p in files(written))
    bound = big_written + big_read + GIB + bound_extra
    ok = run.peak_rss <= bound
    rows.append((label, run.seconds, run.peak_rss, total, big_read, big_written, bound, ok))
    print(f"{label:<34} {run.seconds:7.1f} s  peak RSS {run.peak_rss / GIB:6.2f} GiB  wrote {total / GIB:6.2f} GiB  "
          f"largest read {big_read / GIB:5.2f} / written {big_written / GIB:5.2f} GiB  bound {bound / GIB:6.2f} GiB  "
          f"{'[met]' if ok else '[MISSED]'}", flush=True)
    return ok


def bench(name: str, root: Path, checked: bool) -> bool:
    model_dir, imported = root / f"{name}-hf", root / f"{name}-imported"
    made = run_measured([PY, __file__, "--make", name, str(model_dir)])
    if made.returncode != 0:
        print(made.output[-3000:])
        raise SystemExit(f"making {name}: exit status {made.returncode}")
    params = int(made.output.strip().splitlines()[-1])
    model_bytes = sum(p.stat().st_size for p in files(model_dir) if p.suffix == ".safetensors")
    print(f"\n{name}: {params:,} parameters, {model_bytes / GIB:.2f} GiB of bf16 safetensors "
          f"(made in {made.seconds:.0f} s)", flush=True)
    rows: list = []
    iter_dir = imported / "iter_0000000"
    ok = measure("import TP2 x PP2 (--no-verify)", IMPORT + ["--model", str(model_dir), "--out", str(imported),
                 "--tensor", "2", "--pipeline", "2", "--no-verify"], model_dir, "*.safetensors", imported, rows=rows)
    if checked:
        out = root / f"{name}-imported-checked"
        ok &= measure("import TP2 x PP2 (self-checked)", IMPORT + ["--model", str(model_dir), "--out", str(out),
                      "--tensor", "2", "--pipeline", "2"], model_dir, "*.safetensors", out, 4 * params, rows)
        shutil.rmtree(out)
    exported = root / f"{name}-exported"
    ok &= measure("export (--no-verify)", EXPORT + ["--checkpoint", str(imported), "--out", str(exported),
                  "--no-verify"], iter_dir, "mp_rank_*", exported, rows=rows)
    if checked:
        out = root / f"{name}-exported-checked"
        ok &= measure("export (self-checked)", EXPORT + ["--checkpoint", str(imported), "--out", str(out)],
                      iter_dir, "mp_rank_*", out, 4 * params, rows)
        shutil.rmtree(out)
    shutil.rmtree(exported)
    resharded = root / f"{name}-tp1pp1"
    ok &= measure("reshard to TP1 x PP1 x DP1", RESHARD + ["--checkpoint", str(imported), "--tensor", "1",
                  "--pipeline", "1", "--data-parallel", "1", "--out", str(resharded)], iter_dir, "mp_rank_*",
                  resharded, rows=rows)
    ok &= measure("fpa-ckpt verify (TP1 x PP1)", VERIFY + [str(resharded)], resharded, "*", root / "nothing",
                  rows=rows)
    shutil.rmtree(resharded)
    shutil.rmtree(imported)
    shutil.rmtree(model_dir)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,tinyllama", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--no-checked", action="store_true", help="skip the self-checked import and export")
    parser.add_argument("--make", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_model(*args.make)
        return 0
    root = Path(tempfile.mkdtemp(prefix="tooling-memory-", dir=args.dir))
    try:
        ok = all([bench(name, root, not args.no_checked) for name in args.models.split(",")])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nall within the bound" if ok else "\nsome step above the bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
