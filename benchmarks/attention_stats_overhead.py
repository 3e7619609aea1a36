"""Cost of the attention diagnostics on the demo model: one probe (a no-grad forward of one micro-batch with
the collision / entropy / max-logit statistics of every layer and head) against one training step.

The demo config (configs/demo_cpu.yaml: 2 ranks, DP2, ZeRO-1, FPA on) on synthetic data, in real gloo
processes. Training steps and probes alternate round by round, so machine noise hits both alike; the
overhead at interval N is median(probe) / (N x median(step)), printed for the default interval (100) and
a few others, for the eager attention (explicit-softmax statistics) and the blockwise one (online,
key-tile statistics).

    python benchmarks/attention_stats_overhead.py [--rounds 15] [--steps-per-round 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from fpa_megatron.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def bench_rank(values: dict, overrides: list[str], rounds: int, steps_per_round: int):
    import torch
    from megatron.core import parallel_state

    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.data.datasets import build_gpt_datasets, micro_batches
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.attention_diagnostics import AttentionDiagnostics
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.training.optimizer import build_engine, optimizer_step

    cfg = config_from_dict(values, overrides)
    layout = check_config(cfg, torch.distributed.get_world_size())
    init_model_parallel(1, 1, cfg.train.seed)
    penalty = make_penalty(cfg.model, cfg.fpa)
    model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=cfg.train.seed)
    engine = build_engine(model, cfg.optimizer, cfg.model.dtype, cfg.train.micro_batch_size, layout.num_microbatches)
    steps = rounds * steps_per_round + 1
    train_ds, valid_ds, _ = build_gpt_datasets([], None, "98,1,1", cfg.model.seq_length, cfg.train.seed,
                                               (steps * cfg.train.global_batch_size, 64, 0), None, None, mock=True,
                                               mock_vocab_size=layout.vocab_size)
    batches = micro_batches(train_ds, 0, cfg.train.micro_batch_size, parallel_state.get_data_parallel_rank(),
                            layout.data_parallel)
    diagnostics = AttentionDiagnostics(100, model, engine, penalty, valid_ds, train_ds, cfg.train.micro_batch_size,
                                       cfg.model.seq_length)

    def train_step():
        penalty.set_step(cfg.fpa.lambda0, True)
        forward_backward(model, batches, penalty, num_microbatches=layout.num_microbatches,
                         micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.model.seq_length, engine=engine)
        optimizer_step(engine, cfg.optimizer.lr)

    def timed(fn) -> float:
        torch.distributed.barrier()
        start = time.perf_counter()
        fn()
        torch.distributed.barrier()
        return time.perf_counter() - start

    train_step()  # warm-up: first-call allocations
    diagnostics.measure()
    step_times, probe_times = [], []
    for _ in range(rounds):
        step_times += [timed(train_step) for _ in range(steps_per_round)]
        probe_times.append(timed(diagnostics.measure))
    return step_times, probe_times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    values = yaml.safe_load((ROOT / "configs" / "demo_cpu.yaml").read_text())
    world = values["train"]["global_batch_size"] // values["train"]["micro_batch_size"]
    print(f"demo model (configs/demo_cpu.yaml), {world} ranks, synthetic data, FPA on; {args.rounds} rounds of "
          f"{args.steps_per_round} training steps + 1 probe")
    print(f"{'attention':10s} {'step s':>8s} {'probe s':>8s} {'probe/step':>10s} "
          f"{'overhead @100':>14s} {'@50':>7s} {'@10':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        common = ["data.mock=true", "data.tokenizer=null", f"model.vocab_size={args.vocab}", f"logging.dir={tmp}"]
        for impl in ("eager", "blockwise"):
            step_times, probe_times = run_distributed(bench_rank, world, values, common + [f"model.attention_impl={impl}"],
                                                      args.rounds, args.steps_per_round, timeout_s=3600)[0]
            step, probe = statistics.median(step_times), statistics.median(probe_times)
            ratio = probe / step
            print(f"{impl:10s} {step:8.3f} {probe:8.3f} {ratio:10.3f} {ratio / 100:14.2%} {ratio / 50:7.2%} "
                  f"{ratio / 10:7.2%}")


if __name__ == "__main__":
    main()
