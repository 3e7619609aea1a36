"""Step time of the interleaved pipeline: PP2 x VP2 against PP2 (1F1B), side by side on the same 2 gloo ranks.

`train(cfg)` of a GPT with 4 layers, hidden 256, 8 heads, sequence 256, vocab 8192 (synthetic tokens), 8
micro-batches of 1 sequence per step (DP 1), FPA on. One spawn of 2 ranks runs both layouts in alternating
rounds (the order flips every round, so a slow drift of a shared machine hits both alike); each round's
ratio is the median step time of PP2 x VP2 over that of PP2 (steps after the warm-up), and the result is the
median of the per-round ratios with their min..max.

The 1F1B bubble is (p - 1) / m of the step; interleaving over v chunks divides it by v at the price of v times
the point-to-point messages. With PP 2 and m = 8 the model bubble is 1/8 -> 1/16 of the step. Target (issue
17): ratio < 1.0.

    python benchmarks/pipeline_interleaved.py [--rounds 3] [--steps 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from fpa_megatron.testing import run_distributed

MODEL = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "seq_length": 256, "vocab_size": 8192}
LAYOUTS = {"PP2": ["parallel.pipeline=2"], "PP2 x VP2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]}


def rounds_rank(values: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """On each rank: every round, train(cfg) once per layout; the median step time of each run."""
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    medians: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(rounds):
        for name in (list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))):
            history = train(config_from_dict(values, LAYOUTS[name] + [f"logging.run_name=r{r}"]))
            medians[name].append(statistics.median(h["iter_time_s"] for h in history[warmup:]))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        values = {
            "model": MODEL, "fpa": {"lambda0": 1e-3},
            "optimizer": {"zero_stage": 1, "warmup_steps": 1},
            "data": {"mock": True},
            "train": {"steps": args.steps, "micro_batch_size": 1, "global_batch_size": 8, "eval_interval": 0},
            "checkpoint": {"save_at_end": False, "resume": "none", "interval": 0},
            "logging": {"dir": tmp, "interval": args.steps, "tensorboard": False},
        }
        medians = run_distributed(rounds_rank, 2, values, args.rounds, args.warmup, timeout_s=1800)[0]
    ratios = [v / p for v, p in zip(medians["PP2 x VP2"], medians["PP2"])]
    print(f"GPT 4 layers x hidden 256, seq 256, 8 micro-batches of 1 per step, 2 gloo ranks; {args.rounds} "
          f"alternating rounds of {args.steps} steps ({args.warmup} warm-up)")
    for name, values_s in medians.items():
        print(f"{name:10s} step time per round: " + ", ".join(f"{s * 1000:.0f} ms" for s in values_s))
    print(f"PP2 x VP2 / PP2 step time: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f};"
          f" target < 1.0)")


if __name__ == "__main__":
    main()
