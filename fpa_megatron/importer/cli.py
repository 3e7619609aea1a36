"""`fpa-import hf --model DIR --out DIR [--tensor T --pipeline P --data-parallel D] [--write-config FILE] [key=value]`:
a Hugging Face transformers checkpoint (GPT-2, GPT-NeoX, LLaMA / Mistral) as a complete fpa-megatron checkpoint
at step 0, weights only (no optimizer state); train from it with `checkpoint.init_from=DIR` (a fresh AdamW), or
make it a complete checkpoint with `fpa-reshard`.

The model section comes from the model's config.json; `key.sub=value` overrides set the rest of the run config
(e.g. model.seq_length=1024 data.tokenizer=tok.model optimizer.lr=1e-4). Anything Megatron's GPT cannot compute
exactly is refused, naming the key, before anything is written. The written checkpoint then checks itself: its
own model (read back, float32) must give the transformers model's logits on a fixed sample, or OUT is removed
and the command exits 2 naming the difference (`--no-verify` skips it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from data_prep.quiet import quiet_optional_dependency_warnings


def main(argv: Optional[list[str]] = None) -> int:
    quiet_optional_dependency_warnings()  # before anything imports megatron
    parser = argparse.ArgumentParser(prog="fpa-import", description="Import a model into an fpa-megatron checkpoint.")
    formats = parser.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face transformers directory (GPT-2, GPT-NeoX, LLaMA, Mistral)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hf.add_argument("--model", required=True, help="directory with config.json and the weights (safetensors or .bin)")
    hf.add_argument("--out", required=True, help="new checkpoint root (must not exist, or be empty)")
    hf.add_argument("--tensor", type=int, default=1, help="tensor-parallel size of the checkpoint")
    hf.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size of the checkpoint")
    hf.add_argument("--data-parallel", type=int, default=1, help="data-parallel size (ZeRO partitions)")
    hf.add_argument("--write-config", default=None, help="also write a full run config YAML (model section from "
                    "config.json, checkpoint.init_from = --out)")
    hf.add_argument("--no-verify", action="store_true",
                    help="skip the check of the written checkpoint's logits against the transformers model")
    hf.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest accepted |logit difference| of that check (float32 on both sides)")
    hf.add_argument("overrides", nargs="*", help="key.sub=value settings of the run config")
    args = parser.parse_args(argv)

    from fpa_megatron.config import ConfigError
    from fpa_megatron.export.hf import ExportError, quiet_transformers
    from fpa_megatron.importer.hf import HFImportError, import_hf

    quiet_transformers()
    try:
        import_hf(args.model, args.out, args.tensor, args.pipeline, args.data_parallel, args.overrides,
                  args.write_config, verify=not args.no_verify, tolerance=args.tolerance)
    except (HFImportError, ConfigError, ExportError) as err:
        print(f"fpa-import: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
