"""Sequence parallelism: peak tensor memory per rank and step time, TP2 + SP against TP2 (issue 17).

Two gloo ranks build the same GPT twice in one process group, once with `sequence_parallel` and once
without, and run one optimizer step's forward and backward (Megatron's schedule, `forward_backward`, FPA
penalty on; the optimizer update is the same in both and left out) on the same micro-batches.

Peak tensor memory: a TorchDispatchMode that counts every storage an op creates while it is alive (weakref
finalizers see the frees; views share their storage and count once), so the figure is the bytes of live
tensors the step added on top of the weights (activations, temporaries, gradients, communication buffers),
not the allocator's or the OS's view (`fpa_megatron.model.live_memory.LiveTensorBytes`, the counter the
planner is tested against). The maximum over the two ranks is reported. Also timed: the backend's all-reduce
against a reduce-scatter + all-gather of one [S, hidden] activation (what TP and SP send per norm region).
Time: the cases alternate round by round in the same processes (rank 0's wall time of the step, medians).
Targets: peak TP2+SP / TP2 <= 0.7 at S = 2048, time <= 1.05. What SP can save is only what lives in the
norm / residual region: per layer the two norms' inputs and the QKV / fc1 inputs (Megatron's linears keep the
local slice and all-gather it again in backward), 4 of the ~12 s*b*h fp32 tensors a layer keeps here (no
dropout masks, blockwise attention: no S x S buffer); the column-parallel activations are split by TP anyway.
Korthikanti et al.'s own accounting gives 34/t / (10 + 24/t) = 0.77 at t = 2 (16-bit, with dropout masks).

    python benchmarks/sequence_parallel.py [--seq 2048] [--hidden 256] [--layers 4] [--heads 8] [--rounds 5]
        [--recompute none selective] [--vocab 1024] [--tensor 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fpa_megatron.model.live_memory import LiveTensorBytes
from fpa_megatron.testing import run_distributed


def bench_rank(args) -> dict:
    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward

    init_model_parallel(args.tensor, 1, seed=1)
    micro, num_micro = 1, 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (num_micro * micro, args.seq + 1), generator=g)
    batches = [dict(tokens=tokens[i:i + 1, :-1], labels=tokens[i:i + 1, 1:], loss_mask=torch.ones(micro, args.seq),
                    position_ids=torch.arange(args.seq)[None]) for i in range(num_micro)]
    models = {}
    for recompute in args.recompute:
        mc = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         seq_length=args.seq, recompute=recompute, attention_impl="auto")
        for sp in (False, True):
            penalty = make_penalty(mc, FPAConfig())
            penalty.set_step(0.1, True)
            models[recompute, sp] = (build_gpt_model(mc, args.vocab, penalty, seed=3, sequence_parallel=sp), penalty)

    def step(key):
        model, penalty = models[key]
        model.zero_grad(set_to_none=True)
        result = forward_backward(model, iter(batches), penalty, num_microbatches=num_micro, micro_batch_size=micro,
                                  seq_length=args.seq)
        model.zero_grad(set_to_none=True)
        return result.lm_loss

    out = {"peak_mib": {}, "seconds": {k: [] for k in models}, "loss": {}}
    for key in models:  # memory: one counted step each (after a warm-up step)
        step(key)
        with LiveTensorBytes() as counter:
            out["loss"][key] = step(key)
        peak = torch.tensor(float(counter.peak))
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        out["peak_mib"][key] = float(peak) / 2**20
    keys = list(models)
    for r in range(args.rounds):  # time: alternating order, same processes
        for key in (keys if r % 2 == 0 else keys[::-1]):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            step(key)
            out["seconds"][key].append(time.perf_counter() - t0)
    out["collectives"] = time_collectives(args.seq, args.hidden)
    return out


def time_collectives(seq: int, hidden: int, rounds: int = 20) -> dict:
    """Median seconds of what each layout sends per norm region on this backend, for one [seq, hidden] fp32
    activation over the TP group: TP's all-reduce, SP's reduce-scatter + all-gather (on NCCL a ring
    all-reduce is itself a reduce-scatter + all-gather, so the two move the same bytes)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.randn(seq, hidden)
    shard, full = torch.empty(seq // torch.distributed.get_world_size(group), hidden), torch.empty(seq, hidden)
    seconds = {"all_reduce": [], "reduce_scatter_all_gather": []}
    for _ in range(rounds):
        torch.distributed.barrier(group)
        t0 = time.perf_counter()
        torch.distributed.all_reduce(x, group=group)
        seconds["all_reduce"].append(time.perf_counter() - t0)
        torch.distributed.barrier(group)
        t0 = time.perf_counter()
        torch.distributed.reduce_scatter_tensor(shard, x, group=group)
        torch.distributed.all_gather_into_tensor(full, shard, group=group)
        seconds["reduce_scatter_all_gather"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tensor", type=int, default=2, help="TP size (= ranks); the targets are for 2")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective"])
    args = parser.parse_args()
    res = run_distributed(bench_rank, args.tensor, args, timeout_s=1800)[0]
    tp = f"TP{args.tensor}"
    print(f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, S={args.seq}, vocab {args.vocab}, "
          f"2 micro-batches of 1, fp32, FPA on (blockwise attention), {args.tensor} gloo ranks ({tp})")
    summary = {}
    for recompute in args.recompute:
        tp2, sp = (recompute, False), (recompute, True)
        mem = res["peak_mib"][sp] / res["peak_mib"][tp2]
        ratios = [b / a for a, b in zip(res["seconds"][tp2], res["seconds"][sp])]
        time_ratio = statistics.median(ratios)
        print(f"recompute={recompute}: peak tensor memory per rank {tp} {res['peak_mib'][tp2]:.1f} MiB, "
              f"{tp}+SP {res['peak_mib'][sp]:.1f} MiB -> {mem:.3f} [{'met' if mem <= 0.7 else 'MISSED'} <= 0.7]; "
              f"step {tp} {statistics.median(res['seconds'][tp2]):.2f} s, {tp}+SP "
              f"{statistics.median(res['seconds'][sp]):.2f} s -> {time_ratio:.3f} "
              f"[{min(ratios):.3f}..{max(ratios):.3f}] [{'met' if time_ratio <= 1.05 else 'MISSED'} <= 1.05]; "
              f"loss {res['loss'][tp2]:.6f} vs {res['loss'][sp]:.6f}")
        summary[recompute] = {"peak_mib_tp2": res["peak_mib"][tp2], "peak_mib_tp2_sp": res["peak_mib"][sp],
                              "memory_ratio": mem, "time_ratio": time_ratio, "time_ratios": ratios}
    comm = res["collectives"]
    summary["collectives_s"] = comm
    print(f"the backend's collectives for one [{args.seq}, {args.hidden}] fp32 activation: all-reduce (TP) "
          f"{comm['all_reduce'] * 1e3:.2f} ms, reduce-scatter + all-gather (SP) "
          f"{comm['reduce_scatter_all_gather'] * 1e3:.2f} ms -> "
          f"{comm['reduce_scatter_all_gather'] / comm['all_reduce']:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
