"""The attention alone under context parallelism: CP2 (2 gloo ranks, 1 thread each) against one process holding
the whole sequence, forward + backward, side by side in one run (rounds alternate; medians of the per-round
times). Prints the speedup single / CP2 per kernel, and the share of the K/V exchange in the CP2 step.

    python benchmarks/context_attention.py [--seq 4096] [--heads 8] [--kv-heads 8] [--head-dim 32] [--rounds 5]
                                           [--split-only]

--split-only: no processes; one process times each CP2 rank's kernel work (the partials of its two chunks,
merges and partial backwards, as fpa_megatron/attention/context_parallel.py runs them, without the exchange) against the whole
sequence: the speedup CP2 reaches when the two ranks really run on two free cores. (On a shared machine two
concurrent processes may not get two cores; then the CP2 figure above is the machine's, not the method's.)

The layout of the issue's benchmark (hidden 256, 8 heads): d = 32. The whole training step is
benchmarks/context_parallel.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from fpa_megatron.attention.context_parallel import (_BlockwiseKernel, _GradScatter, _KVGather, _SdpaCpuKernel, context_parallel_attention)
from fpa_megatron.parallel.context import cp_chunk_bounds
from fpa_megatron.attention.partial import merge_partials, row_penalty, score_grad_shift
from fpa_megatron.testing import run_distributed

KERNELS = {"blockwise (FPA probs)": ("blockwise", True), "sdpa (no penalty)": ("sdpa", False)}


def _step(q, k, v, kernel, compute_penalty, group):
    """One forward + backward of the attention (the loss touches the output and the penalty)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, penalty = context_parallel_attention(*leaves, q.shape[-1] ** -0.5, cp_group=group, kernel=kernel,
                                              compute_penalty=compute_penalty)
    loss = out.square().sum() + (penalty.sum() if penalty is not None else 0.0)
    loss.backward()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rank(seq: int, heads: int, kv_heads: int, head_dim: int, rounds: int):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, head_dim, generator=g) for h in (heads, kv_heads, kv_heads))
    (a0, a1), (b0, b1) = cp_chunk_bounds(seq, 2, rank)
    local = [torch.cat([t[:, :, a0:a1], t[:, :, b0:b1]], dim=2) for t in (q, k, v)]
    alone = dist.new_group([0])  # a group of one: the single-process kernels on the whole sequence
    times = {name: {"cp2": [], "single": []} for name in KERNELS}
    exchange = []
    for _ in range(rounds):
        for name, (kernel, penalty) in KERNELS.items():
            dist.barrier()
            times[name]["cp2"].append(_timed(lambda: _step(*local, kernel, penalty, dist.group.WORLD)))
            dist.barrier()
            if rank == 0:  # rank 1 waits at the barrier meanwhile
                times[name]["single"].append(_timed(lambda: _step(q, k, v, kernel, penalty, alone)))
        dist.barrier()
        exchange.append(_timed(lambda: (_KVGather(local[1], local[2], None).wait(),
                                        _GradScatter(torch.zeros((2, 2) + local[1].shape), None).wait())))
    return times, exchange


def _rank_kernel_work(q, k, v, kernel, rank: int) -> None:
    """CP2 rank `rank`'s kernel calls on the whole-sequence q, k, v [b, h, S, d], in one process: per local
    chunk its diagonal and earlier chunks, the merge, then each partial's backward (what
    ContextParallelAttention runs, minus the exchange)."""
    c = q.shape[2] // 4
    for chunk in (rank, 3 - rank):
        qh = q[:, :, chunk * c:(chunk + 1) * c]
        keys = [(chunk * c, (chunk + 1) * c, True)] + ([(0, chunk * c, False)] if chunk else [])
        parts = [kernel.forward(qh, k[:, :, a:b], v[:, :, a:b], causal) for a, b, causal in keys]
        merged = merge_partials(parts, kernel.target)
        out = merged.out.to(q.dtype)
        penalty = row_penalty(merged, kernel.target).float() if kernel.target else None
        grad_out, grad_penalty = 2 * out, None if penalty is None else torch.ones_like(penalty)
        delta = score_grad_shift(out, grad_out, penalty, grad_penalty)
        for a, b, causal in keys:
            kernel.backward(qh, k[:, :, a:b], v[:, :, a:b], grad_out, out, merged.lse2, delta, grad_penalty, causal)


def split_only(seq: int, heads: int, kv_heads: int, head_dim: int, rounds: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, head_dim, generator=g) for h in (heads, kv_heads, kv_heads))
    scale = head_dim ** -0.5
    kernels = {"blockwise (FPA probs)": ("blockwise", True, _BlockwiseKernel(scale, "probs", 64)),
               "sdpa (no penalty)": ("sdpa", False, _SdpaCpuKernel(scale))}
    print(f"S={seq}, heads {heads} (kv {kv_heads}), d={head_dim}, fwd+bwd, 1 thread, median of {rounds} rounds")
    for name, (kernel, penalty, impl) in kernels.items():
        single, ranks = [], []
        for _ in range(rounds):
            single.append(_timed(lambda: _step(q, k, v, kernel, penalty, None)))
            ranks.append(max(_timed(lambda: _rank_kernel_work(q, k, v, impl, r)) for r in (0, 1)))
        one, slowest = statistics.median(single), statistics.median(ranks)
        print(f"  {name:24s} whole sequence {one:7.3f} s   slowest CP2 rank's kernel work {slowest:7.3f} s   "
              f"speedup {one / slowest:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--split-only", action="store_true", help="one process: each rank's kernel work alone")
    args = parser.parse_args()
    if args.split_only:
        return split_only(args.seq, args.heads, args.kv_heads, args.head_dim, args.rounds)
    results = run_distributed(_rank, 2, args.seq, args.heads, args.kv_heads, args.head_dim, args.rounds,
                              timeout_s=3600)
    times, exchange = results[0]
    print(f"S={args.seq}, heads {args.heads} (kv {args.kv_heads}), d={args.head_dim}, fwd+bwd, 1 thread per rank, "
          f"median of {args.rounds} rounds")
    for name, t in times.items():
        cp2, single = statistics.median(t["cp2"]), statistics.median(t["single"])
        print(f"  {name:24s} one process {single:7.3f} s   CP2 {cp2:7.3f} s   speedup {single / cp2:5.2f}x")
    cp2 = statistics.median(times["blockwise (FPA probs)"]["cp2"])
    print(f"  K/V all-gather + dK/dV reduce-scatter alone: {statistics.median(exchange) * 1e3:.1f} ms per layer "
          f"({statistics.median(exchange) / cp2:.1%} of the blockwise CP2 step, before any overlap)")


if __name__ == "__main__":
    main()
