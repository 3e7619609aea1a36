"""`fpa-export hf --checkpoint DIR --out DIR`: a training checkpoint as a Hugging Face `transformers` model.

The output directory loads with `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)`,
no custom code: model.safetensors, config.json, generation_config.json (eos = the end-of-document token),
tokenizer.json and tokenizer_config.json.

Before it reports success the export checks itself (export/verify.py): the files are written into a temporary
directory beside OUT, loaded back with transformers and their logits compared with the checkpoint's own model on
a fixed sample; only a model within the tolerance is moved to OUT. Otherwise nothing is left behind and the
command exits 2 naming the difference. `--no-verify` skips the check.

Memory: the weights are converted tensor by tensor from the checkpoint's files and written as safetensors files
of at most --shard-mb (2 GiB), each built, written and let go before the next (about the largest file written plus the
largest file read); the check then holds one float32 copy of the model at a time (4 bytes per parameter).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from data_prep.quiet import quiet_optional_dependency_warnings


def export_hf(checkpoint: str, out: str, tokenizer: Optional[str] = None, overwrite: bool = False,
              verify: bool = True, tolerance: Optional[float] = None, shard_mb: Optional[int] = None) -> int:
    from fpa_megatron.checkpoint.reader import read_model_checkpoint
    from fpa_megatron.export.hf import SHARD_BYTES, ExportError, describe, save_hf, to_hf
    from fpa_megatron.export.verify import DEFAULT_TOLERANCE, verify_export

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to write into it)")
    ckpt = read_model_checkpoint(checkpoint)
    export = to_hf(ckpt, tokenizer, in_memory=False)  # every check happens here, before anything is written
    print(describe(ckpt, export))
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shard_bytes = SHARD_BYTES if shard_mb is None else shard_mb << 20
        written = [out_dir / path.relative_to(staging) for path in save_hf(export, staging, shard_bytes)]
        if verify:
            check = verify_export(ckpt, staging, DEFAULT_TOLERANCE if tolerance is None else tolerance)
            if not check.ok:
                raise ExportError(f"the export does not reproduce the checkpoint: {check.describe()}; nothing was "
                                  f"written to {out_dir} (--no-verify skips this check)")
            print(f"verified: {check.describe()}")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out_dir}/:")
    for path in written:
        print(f"  {str(path.relative_to(out_dir)):<28} {path.stat().st_size:>14,} bytes")
    if export.tokenizer is None:
        print("  (no tokenizer: the run used mock data)")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}), "
          f"AutoTokenizer.from_pretrained({str(out_dir)!r})")
    return 0


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """The checked files into --out: a rename of the directory, or of each file into an existing one (--overwrite
    replaces the files of the same name and keeps the others, as writing into it did)."""
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
        return
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out_dir / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def main(argv: Optional[list[str]] = None) -> int:
    quiet_optional_dependency_warnings()  # before anything imports megatron
    parser = argparse.ArgumentParser(prog="fpa-export", description="Export a training checkpoint.")
    formats = parser.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="Hugging Face transformers directory (GPT-2, GPT-NeoX or LLaMA)",
                            description=__doc__)
    hf.add_argument("--checkpoint", required=True,
                    help="an iter_XXXXXXX directory, a checkpoint root or a run directory")
    hf.add_argument("--out", required=True, help="output directory")
    hf.add_argument("--tokenizer", default=None,
                    help="the run's tokenizer (.model or tokenizer.json), if it moved since training")
    hf.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    hf.add_argument("--no-verify", action="store_true",
                    help="skip the check of the written model's logits against the checkpoint's own model")
    hf.add_argument("--tolerance", type=float, default=None,
                    help="largest accepted |logit difference| of that check (default 1e-3, float32 on both sides)")
    hf.add_argument("--shard-mb", type=int, default=None,
                    help="largest safetensors file to write, MiB (default 2048; bigger models get numbered files "
                    "and model.safetensors.index.json, as transformers writes them)")
    args = parser.parse_args(argv)

    from fpa_megatron.config import ConfigError
    from fpa_megatron.export.hf import ExportError, quiet_transformers
    from fpa_megatron.checkpoint.reader import CheckpointError

    quiet_transformers()
    try:
        return export_hf(args.checkpoint, args.out, args.tokenizer, args.overwrite, not args.no_verify, args.tolerance,
                         args.shard_mb)
    except (CheckpointError, ConfigError, ExportError, FileExistsError) as err:
        print(f"fpa-export: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
