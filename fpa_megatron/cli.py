"""`fpa-train --config FILE [key.sub=value ...]`: one pretraining run (launch it under torchrun).

The exit status says how the run ended (fpa_megatron/exit_codes.py): 0 done, 2 config error, 75 preempted
with a checkpoint, 81 diverged, 82 loss spike, 83 a collective timed out, 1 any other failure. A failing rank
logs its traceback and one line naming its rank, host and step.
"""

from __future__ import annotations

import argparse
import os
import sys

from fpa_megatron import exit_codes
from fpa_megatron.config import ConfigError, load_config
from data_prep.quiet import quiet_optional_dependency_warnings, quiet_training_notices


def main(argv: list[str] | None = None) -> int:
    quiet_optional_dependency_warnings()
    parser = argparse.ArgumentParser(
        prog="fpa-train",
        description="Pretrain a GPT with the FPA attention penalty on Megatron-core + DeepSpeed ZeRO. "
        "Run under torchrun (see launch/torchrun.sh); a single process also works.",
    )
    parser.add_argument("--config", help="YAML run config (configs/demo_cpu.yaml, configs/gpt_1.3b.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 parallel.tensor=2")
    parser.add_argument("--check-only", action="store_true",
                        help="check the config and data as the ranks would (WORLD_SIZE ranks, default 1), print the "
                        "run directory and exit 0, or 2 with the one error line; the launchers run it before torchrun")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from fpa_megatron.preflight import check_config

        layout = check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError) as err:
        print(f"fpa-train: config error: {err}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    if args.check_only:
        from fpa_megatron.config import run_dir

        print(run_dir(cfg))
        return exit_codes.OK
    quiet_training_notices()
    from fpa_megatron.run_log import failure_line, is_collective_timeout, setup_logging
    from fpa_megatron.training.trainer import train

    log = setup_logging()
    try:
        train(cfg, layout)
    except exit_codes.RunStopped as stop:  # decided by all ranks together: reported once per node (the
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # node's launch/torchrun.sh reads the code from it)
            report = log.warning if stop.exit_code == exit_codes.PREEMPTED else log.error
            report(f"{stop} (exit code {stop.exit_code}: {exit_codes.DESCRIPTIONS[stop.exit_code]})")
        return stop.exit_code
    except Exception as err:  # noqa: BLE001 - every rank reports its own failure, then exits non-zero
        log.error("traceback of the failure:", exc_info=err)
        log.error(failure_line(err, cfg.parallel.timeout_minutes))
        return exit_codes.COLLECTIVE_TIMEOUT if is_collective_timeout(err) else exit_codes.FAILED
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
