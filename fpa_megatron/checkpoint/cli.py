"""The checkpoint commands: `fpa-reshard` (`reshard_main`, see reshard.py) and `fpa-ckpt` (`ckpt_main`, see
integrity.py). Parsing the arguments (and `--help`) imports neither torch nor the checkpoint code: each command
imports what it runs inside its main."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from data_prep.quiet import quiet_optional_dependency_warnings
from fpa_megatron.checkpoint.integrity import MARKER, checkpoint_state


def reshard_main(argv: Optional[list[str]] = None) -> int:
    """`fpa-reshard`: rewrite a checkpoint for another layout."""
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
    from fpa_megatron.checkpoint.reader import CheckpointError
    from fpa_megatron.checkpoint.reshard import reshard
    from fpa_megatron.config import ConfigError

    try:
        reshard(args.checkpoint, args.out, args.tensor, args.pipeline, args.data_parallel, args.world_size,
                args.reset_optimizer, virtual_pipeline=args.virtual_pipeline, context=args.context)
    except (CheckpointError, ConfigError) as err:
        print(f"fpa-reshard: error: {err}", file=sys.stderr)
        return 2
    return 0


def _verify(target: Path) -> int:
    """Print the state of a checkpoint, or of each checkpoint under a checkpoint root; 1 if the asked one
    (the checkpoint itself, or the one the root's `latest` names) is not intact."""
    if (target / MARKER).is_file() or target.name.startswith("iter_"):
        line, ok = checkpoint_state(target)
        print(f"{target}: {line}")
        return 0 if ok else 1
    roots = [r for r in (target, target / "checkpoints") if r.is_dir() and any(r.glob("iter_*"))]
    if not roots:
        print(f"fpa-ckpt: {target} holds no checkpoint (iter_*)", file=sys.stderr)
        return 2
    root = roots[0]
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    asked_ok = latest is None
    for path in sorted(p for p in root.glob("iter_*") if p.is_dir()):
        line, ok = checkpoint_state(path)
        mark = "  <- latest" if path.name == latest else ""
        print(f"{path.name}: {line}{mark}")
        if path.name == latest:
            asked_ok = ok
    for path in sorted(p for p in (root / "abandoned").glob("iter_*") if p.is_dir()):
        print(f"abandoned/{path.name}: {checkpoint_state(path)[0]}")
    if latest is not None and not (root / latest).is_dir():
        print(f"latest names {latest!r}, which does not exist")
        asked_ok = False
    return 0 if asked_ok else 1


def ckpt_main(argv: Optional[list[str]] = None) -> int:
    """`fpa-ckpt verify DIR`: the state of a checkpoint, or of every checkpoint under a root."""
    parser = argparse.ArgumentParser(prog="fpa-ckpt", description="Inspect training checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every file of a checkpoint against its recorded checksum")
    verify.add_argument("dir", help="an iter_XXXXXXX checkpoint, a checkpoint root or a run directory")
    args = parser.parse_args(argv)
    target = Path(args.dir)
    if not target.exists():
        print(f"fpa-ckpt: {target} does not exist", file=sys.stderr)
        return 2
    return _verify(target)


