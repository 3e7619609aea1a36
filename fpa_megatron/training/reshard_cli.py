"""`fpa-reshard`: the command line of `fpa_megatron.training.reshard` (see its docstring). Kept apart so that
parsing the arguments (and `--help`) imports neither torch nor the checkpoint code."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from fpa_megatron.quiet import quiet_optional_dependency_warnings


def main(argv: Optional[list[str]] = None) -> int:
    quiet_optional_dependency_warnings()
    parser = argparse.ArgumentParser(
        prog="fpa-reshard",
        description="Rewrite a checkpoint for another tensor / context / pipeline / data-parallel layout, with the model, "
        "the optimizer state (ZeRO partitions regathered), the data position and the lambda schedule.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a complete checkpoint: an iter_* directory, or a checkpoint root or run directory "
                        "(its newest complete one)")
    parser.add_argument("--tensor", type=int, required=True, help="new tensor-parallel size")
    parser.add_argument("--pipeline", type=int, required=True, help="new pipeline-parallel size")
    parser.add_argument("--virtual-pipeline", type=int, default=1,
                        help="new number of model chunks per pipeline stage (interleaved schedule; default 1)")
    parser.add_argument("--context", type=int, help="new context-parallel size (default: the checkpoint's)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--data-parallel", type=int, help="new data-parallel size (ZeRO partitions)")
    size.add_argument("--world-size", type=int, help="number of ranks of the resumed run (DP = N / (TP x CP x PP))")
    parser.add_argument("--out", required=True, help="new checkpoint root (must not exist)")
    parser.add_argument("--reset-optimizer", action="store_true",
                        help="do not carry the optimizer state: AdamW restarts (moments 0, step 0)")
    args = parser.parse_args(argv)
    from fpa_megatron.config import ConfigError
    from fpa_megatron.training.checkpoint_reader import CheckpointError
    from fpa_megatron.training.reshard import reshard

    try:
        reshard(args.checkpoint, args.out, args.tensor, args.pipeline, args.data_parallel, args.world_size,
                args.reset_optimizer, virtual_pipeline=args.virtual_pipeline, context=args.context)
    except (CheckpointError, ConfigError) as err:
        print(f"fpa-reshard: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
