"""Training throughput of the demo model: 1 rank against 2 ranks under TP2, PP2 and DP2 (ZeRO-1).

Each layout runs `train(cfg)` of configs/demo_cpu.yaml on synthetic data (data.mock) for a few steps in
real gloo processes; layouts are interleaved round by round so machine noise hits them alike. Prints the
median tokens/s per layout (steps after the warm-up) and each one's ratio to the single rank.

    python benchmarks/train_throughput.py [--rounds 2] [--steps 12] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from fpa_megatron.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "1 rank": (1, []),
    "TP2": (2, ["parallel.tensor=2"]),
    "PP2": (2, ["parallel.pipeline=2"]),
    "DP2 ZeRO-1": (2, ["optimizer.zero_stage=1"]),
}


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return [h["tokens_per_s"] for h in train(config_from_dict(values, overrides))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    values = yaml.safe_load((ROOT / "configs" / "demo_cpu.yaml").read_text())
    samples: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.steps={args.steps}", "train.eval_interval=0", "data.mock=true", "data.tokenizer=null",
                  f"model.vocab_size={args.vocab}", "checkpoint.save_at_end=false", "checkpoint.resume=none",
                  "logging.tensorboard=false", f"logging.interval={args.steps}", f"logging.dir={tmp}"]
        for r in range(args.rounds):
            names = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for name in names:
                world, overrides = LAYOUTS[name]
                tokens_per_s = run_distributed(train_rank, world, values, common + overrides, timeout_s=1800)[0]
                samples[name].extend(tokens_per_s[args.warmup:])
    base = statistics.median(samples["1 rank"])
    print(f"demo model (configs/demo_cpu.yaml), synthetic data, global batch {values['train']['global_batch_size']}"
          f" x seq {values['model']['seq_length']}, {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'layout':12s} {'tokens/s':>10s} {'vs 1 rank':>10s}")
    for name, vals in samples.items():
        med = statistics.median(vals)
        print(f"{name:12s} {med:10.0f} {med / base:10.2f}x")


if __name__ == "__main__":
    main()
