"""`fpa-train --config FILE [key.sub=value ...]`: one pretraining run (launch it under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys

from fpa_megatron.config import ConfigError, load_config
from fpa_megatron.quiet import quiet_optional_dependency_warnings


def main(argv: list[str] | None = None) -> int:
    quiet_optional_dependency_warnings()
    parser = argparse.ArgumentParser(
        prog="fpa-train",
        description="Pretrain a GPT with the FPA attention penalty on Megatron-core + DeepSpeed ZeRO. "
        "Run under torchrun (see launch/torchrun.sh); a single process also works.",
    )
    parser.add_argument("--config", help="YAML run config (configs/demo_cpu.yaml, configs/gpt_1.3b.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 parallel.tensor=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from fpa_megatron.config_checks import check_config

        layout = check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError) as err:
        print(f"fpa-train: config error: {err}", file=sys.stderr)
        return 2
    from fpa_megatron.training.trainer import train

    train(cfg, layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
