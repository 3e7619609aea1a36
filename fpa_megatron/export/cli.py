"""`fpa-export hf --checkpoint DIR --out DIR`: a training checkpoint as a Hugging Face `transformers` model.

The output directory loads with `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)`,
no custom code: model.safetensors, config.json, generation_config.json (eos = the end-of-document token),
tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from data_prep.quiet import quiet_optional_dependency_warnings


def export_hf(checkpoint: str, out: str, tokenizer: Optional[str] = None, overwrite: bool = False) -> int:
    from fpa_megatron.export.hf import describe, save_hf, to_hf
    from fpa_megatron.checkpoint.reader import read_model_checkpoint

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to write into it)")
    ckpt = read_model_checkpoint(checkpoint)
    export = to_hf(ckpt, tokenizer)  # every check happens here, before anything is written
    print(describe(ckpt, export))
    files = save_hf(export, out_dir)
    print(f"wrote {out_dir}/:")
    for path in files:
        print(f"  {str(path.relative_to(out_dir)):<28} {path.stat().st_size:>14,} bytes")
    if export.tokenizer is None:
        print("  (no tokenizer: the run used mock data)")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}), "
          f"AutoTokenizer.from_pretrained({str(out_dir)!r})")
    return 0


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
    args = parser.parse_args(argv)

    from fpa_megatron.config import ConfigError
    from fpa_megatron.export.hf import ExportError, quiet_transformers
    from fpa_megatron.checkpoint.reader import CheckpointError

    quiet_transformers()
    try:
        return export_hf(args.checkpoint, args.out, args.tokenizer, args.overwrite)
    except (CheckpointError, ConfigError, ExportError, FileExistsError) as err:
        print(f"fpa-export: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
