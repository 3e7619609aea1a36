"""One short bf16 training run on one GPU: tokens/s, MFU and peak memory against fpa-plan's prediction.

Runs `train(cfg)` in this process (world size 1) on mock data for --steps steps, with the FPA penalty on
(model.attention_impl auto: the Triton kernel) or off (--fpa off: SDPA, FlashAttention on CUDA). Tokens/s and
MFU are medians over the steps after --warmup; peak memory is torch.cuda.max_memory_allocated over the run.
The prediction is the planner's tensor total (weights, gradients, ZeRO states, activation peak; no margin)
for the same layout. Scripts/gpu_check.sh runs it twice; --predict-only prints the prediction without a GPU.

    python benchmarks/gpu_train_check.py --config configs/gpt_125m.yaml --fpa on --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from fpa_megatron.config import load_config
from fpa_megatron.model.memory import GIB, step_memory
from fpa_megatron.planner.search import own_layout, planning_config


def run_overrides(args, log_dir: str) -> list[str]:
    return [f"fpa.enabled={'true' if args.fpa == 'on' else 'false'}", "data.mock=true", "data.tokenizer=null",
            "model.dtype=bf16", f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
            "train.eval_interval=0", "checkpoint.resume=none", "checkpoint.save_at_end=false",
            "checkpoint.interval=0", "logging.tensorboard=false", "logging.attention_stats_interval=0",
            f"logging.dir={log_dir}", f"logging.run_name=gpu_check_fpa_{args.fpa}", *args.overrides]


def prediction(cfg) -> dict:
    """The planner's memory terms for cfg's own layout on one GPU."""
    layout, padded_vocab = own_layout(cfg, 1)
    memory = step_memory(planning_config(cfg), layout, padded_vocab, device="cuda")
    return {"layout": layout.name(), "predicted_tensor_gb": memory["tensors"] / GIB,
            "predicted_total_gb": memory["total"] / GIB,
            "terms_gb": {k: memory[k] / GIB for k in ("weights", "gradients", "master_fp32", "adam_moments",
                                                      "fp32_gradient_partition", "activations")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--fpa", choices=("on", "off"), default="on")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians (compiles, autotune)")
    parser.add_argument("--global-batch", type=int, default=32, help="train.global_batch_size (short steps)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--predict-only", action="store_true", help="only the planner's prediction (no GPU)")
    args = parser.parse_intermixed_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must be larger than --warmup {args.warmup}")

    import torch

    with tempfile.TemporaryDirectory() as log_dir:
        cfg = load_config(args.config, run_overrides(args, log_dir))
        result = {"config": args.config, "fpa": args.fpa, "steps": args.steps, **prediction(cfg)}
        if not args.predict_only:
            if not torch.cuda.is_available():
                print("gpu_train_check: no CUDA device (use --predict-only for the prediction alone)",
                      file=sys.stderr)
                return 3
            for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=os.environ.get("MASTER_PORT", "29533")).items():
                os.environ.setdefault(key, value)
            from fpa_megatron.training.trainer import train

            torch.cuda.reset_peak_memory_stats()
            history = train(cfg)
            timed = history[args.warmup:]
            peak_gb = torch.cuda.max_memory_allocated() / GIB
            result.update(
                device=torch.cuda.get_device_name(),
                tokens_per_s=statistics.median(h["tokens_per_s"] for h in timed),
                mfu=statistics.median(h["mfu"] for h in timed),
                final_lm_loss=history[-1]["lm_loss"],
                peak_memory_gb=peak_gb,
                peak_over_predicted=peak_gb / result["predicted_tensor_gb"],
            )
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
