"""Cost of the FPA penalty in a training step: FPA on, FPA on but past min_lambda, FPA off.

One process (a gloo world of 1), GPT with 4 layers, hidden 256, 8 heads, sequence 512, fp32 on CPU.
The three settings (plus Megatron's stock attention, for reference) are interleaved round by round in
one run (in a shuffled order each round), so machine noise hits them alike; the script prints median
step times and the median of the per-round ratios to FPA off. past_min and off run the same code, so
their ratio shows the noise floor of the measurement.
Targets (issue 2): on/off <= 1.05, past-min/off <= 1.01.

    python benchmarks/penalty_overhead.py [--rounds 8] [--micro-batch 2] [--threads 2] [--impl auto]

With `auto` (the default config) FPA off and past-min run SDPA and FPA on runs blockwise, so on/off is
the whole price of turning the penalty on; with `eager` every setting runs the same kernel.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from fpa_megatron.options import ATTENTION_IMPLS
from fpa_megatron.testing import run_distributed

SEQ, VOCAB = 512, 8192


def bench_rank(rounds: int, micro_batch: int, threads: int, impl: str):
    torch.set_num_threads(threads)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.schedules import LambdaSchedule

    init_model_parallel(1, 1, seed=0)
    mc = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=SEQ, attention_impl=impl)
    penalty = make_penalty(mc, FPAConfig())
    model = build_gpt_model(mc, VOCAB, penalty)
    stock = GPTModel(config=model.config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, share_embeddings_and_output_weights=True, position_embedding_type="rope")
    stock.load_state_dict(model.state_dict(), strict=False)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (model, stock)}

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (micro_batch, SEQ + 1), generator=g)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(micro_batch, SEQ),
                 position_ids=torch.arange(SEQ).expand(micro_batch, SEQ))
    # Past min_lambda: the schedule says inactive, so the attention computes no penalty at all.
    past_min = LambdaSchedule(lambda0=1e-2, gamma=0.5, min_lambda=1e-3)
    settings = {
        "on": (model, 1e-2, True, batch),
        "past_min": (model, past_min.value(10), past_min.active(10), batch),
        "off": (model, 0.0, False, batch),
        "megatron_stock": (stock, 0.0, False, dict(batch, attention_mask=causal)),
    }

    def step(name):
        m, lam, active, b = settings[name]
        penalty.set_step(lam, active)
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        forward_backward(m, iter([b]), penalty, num_microbatches=1, micro_batch_size=micro_batch, seq_length=SEQ)
        optimizers[m].step()
        return time.perf_counter() - t0

    for name in settings:  # warm-up
        step(name)
    times = {name: [] for name in settings}
    calls = {}
    shuffle = random.Random(0)
    for r in range(rounds):
        order = list(settings)
        shuffle.shuffle(order)  # no setting always runs right after another one
        for name in order:
            before = penalty.calls
            times[name].append(step(name))
            calls[name] = penalty.calls - before
    # Paired per-round ratios: each round's settings ran back to back, so slow drifts of the machine cancel.
    paired = {name: statistics.median(a / b for a, b in zip(times[name], times["off"])) for name in settings}
    return {name: statistics.median(t) for name, t in times.items()}, calls, paired


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impl", default="auto", choices=[i for i in ATTENTION_IMPLS if i != "triton"])
    args = parser.parse_args()
    medians, calls, paired = run_distributed(bench_rank, 1, args.rounds, args.micro_batch, args.threads, args.impl,
                                     timeout_s=3600)[0]
    print(f"GPT 4 layers, hidden 256, 8 heads, seq {SEQ}, micro-batch {args.micro_batch}, fp32, "
          f"{args.threads} threads, {args.rounds} interleaved rounds, attention {args.impl}")
    print(f"{'setting':16s} {'median step s':>14s} {'penalty calls/step':>19s} {'vs off (paired)':>16s}")
    for name, t in medians.items():
        print(f"{name:16s} {t:14.4f} {calls.get(name, 0):19d} {paired[name]:16.3f}")
    on_off = paired["on"]
    past_off = paired["past_min"]
    print(f"ratio on/off       = {on_off:.3f}   (target <= 1.05)")
    print(f"ratio past_min/off = {past_off:.3f}   (target <= 1.01)")
    print(f"ratio off/megatron_stock = {1 / paired['megatron_stock']:.3f}   (information)")


if __name__ == "__main__":
    main()
