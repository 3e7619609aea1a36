"""Context parallelism on CPU: a training step of one sequence split over 2 ranks (CP2) against one process
holding the whole sequence (CP1), and the FPA penalty's price under CP2.

GPT with 2 layers, hidden 256, 8 heads, vocabulary 1024, one sequence of S = 4096 and 8192 tokens, fp32,
`model.attention_impl: auto` (FPA on: the blockwise kernel, across the CP ranks under CP2; FPA off: the
penalty-free kernel, torch's fused flash kernel on CPU) and, third, FPA off with the blockwise kernel (the
penalty's own price with the kernel held fixed), 1 thread per rank. A step is Megatron's schedule forward + backward of the micro-batch
(`forward_backward`, what `train()` runs) with the FPA penalty on (lambda 0.1) or off. One run alternates, per
round, a CP1 process and a CP2 pair (2 gloo ranks), each timing its own steps after a warm-up; reported:
median step time (the slower CP rank's), CP1 / CP2 speed-up (target >= 1.6), FPA on / off under CP2 (target
<= 1.10), and the peak memory of the whole step on one rank, CP2 / CP1 at S = 8192 (target <= 0.6), as peak
live tensor bytes (`LiveTensorBytes`, one untimed step: activations, gathered K/V, gradients; not the weights
or libraries) and, second, as the resident memory the step adds (Linux VmHWM over VmRSS after malloc_trim:
an allocator's view, which also counts freed memory glibc keeps and fragmentation, so it is noisier). Also
printed: the CPU seconds of a step, CP1 over the busier CP2 rank (`time.process_time`): how the work splits,
which the wall-clock ratio shows only when two cores are free for the two ranks.

    python benchmarks/context_parallel.py [--rounds 3] [--seqs 4096 8192]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from dataclasses import replace

import torch

from fpa_megatron.testing import run_distributed

VOCAB, LAMBDA = 1024, 0.1
# FPA on (auto: the blockwise kernel), off (auto: torch's fused flash kernel), off with the blockwise kernel
# (the penalty's own price, the kernel held fixed)
SETTINGS = ("on", "off", "off_blockwise")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_rank(context: int, seqs: list[int], steps: int) -> dict:
    """{(seq, 'on'|'off'): {"seconds": [...], "cpu_seconds": [...], "live_mib": float, "rss_mib": float}} on this rank."""
    import torch.distributed as dist

    from fpa_megatron.config import FPAConfig, ModelConfig
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.model.live_memory import LiveTensorBytes
    from fpa_megatron.training.forward_backward import forward_backward

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    out = {}
    for seq in seqs:
        init_model_parallel(1, 1, seed=0, context=context)
        mc = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, seq_length=seq, attention_impl="auto")
        models = {}  # impl -> (model, its penalty: the penalty state carries the kernel choice); the same weights
        for impl in ("auto", "blockwise"):
            impl_config = replace(mc, attention_impl=impl)
            penalty = make_penalty(impl_config, FPAConfig(normalize="mean"))
            models[impl] = build_gpt_model(impl_config, VOCAB, penalty, seed=0), penalty
        g = torch.Generator().manual_seed(seq)
        tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=g)
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, seq),
                     position_ids=torch.arange(seq).unsqueeze(0))

        def step(fpa: str) -> None:
            model, penalty = models["blockwise" if fpa == "off_blockwise" else "auto"]
            penalty.set_step(LAMBDA if fpa == "on" else 0.0, fpa == "on")
            forward_backward(model, iter([batch]), penalty, num_microbatches=1, micro_batch_size=1, seq_length=seq)
            model.zero_grad(set_to_none=True)

        for fpa in SETTINGS:
            step(fpa)  # warm-up
            with LiveTensorBytes() as live:  # an untimed step: the mode's bookkeeping slows every op
                step(fpa)
            libc.malloc_trim(0)  # hand the warm-up's freed memory back, or the timed step reuses it unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set
            before = _rss_kib("VmRSS")
            seconds, cpu_seconds = [], []
            for _ in range(steps):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                step(fpa)
                seconds.append(time.perf_counter() - t0)
                cpu_seconds.append(time.process_time() - c0)
            out[(seq, fpa)] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "live_mib": live.peak / 2**20,
                               "rss_mib": (_rss_kib("VmHWM") - before) / 1024}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per setting and round")
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    args = parser.parse_args()

    samples = {(cp, seq, fpa): [] for cp in (1, 2) for seq in args.seqs for fpa in SETTINGS}
    peaks = {key: [] for key in samples}  # peak live tensor MiB (the larger CP rank's)
    rss = {key: [] for key in samples}
    cpu = {key: [] for key in samples}  # CPU seconds of the step (the busier CP rank's): the work, not the wait
    for r in range(args.rounds):
        for cp in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate the order: a slow spell hits both
            ranks = run_distributed(bench_rank, cp, cp, args.seqs, args.steps, timeout_s=3600)
            for (seq, fpa) in ranks[0]:
                per_step = [max(rank[(seq, fpa)]["seconds"][i] for rank in ranks) for i in range(args.steps)]
                samples[(cp, seq, fpa)] += per_step  # a CP step lasts as long as its slower rank
                cpu[(cp, seq, fpa)] += [max(rank[(seq, fpa)]["cpu_seconds"][i] for rank in ranks)
                                        for i in range(args.steps)]
                peaks[(cp, seq, fpa)].append(max(rank[(seq, fpa)]["live_mib"] for rank in ranks))
                rss[(cp, seq, fpa)].append(max(rank[(seq, fpa)]["rss_mib"] for rank in ranks))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    med = {key: statistics.median(v) for key, v in samples.items()}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
    peak = {key: max(v) for key, v in peaks.items()}  # live bytes are deterministic: the rounds agree
    resident = {key: min(v) for key, v in rss.items()}  # the least disturbed measurement
    print(f"\nstep time (median of {args.rounds * args.steps}), 1 thread per rank; memory per rank: peak live "
          f"tensor MiB of the step (and the resident MiB it adds, VmHWM)")
    print(f"{'S':>6} {'FPA':>13} {'CP1 s':>8} {'CP2 s':>8} {'CP1/CP2':>8} {'CP1 MiB':>8} {'CP2 MiB':>8} {'CP2/CP1':>8}"
          f" {'CP1 RSS':>8} {'CP2 RSS':>8} {'RSS 2/1':>8} {'CPU 1/2':>8}")
    for seq in args.seqs:
        for fpa in SETTINGS:
            one, two = med[(1, seq, fpa)], med[(2, seq, fpa)]
            m1, m2 = peak[(1, seq, fpa)], peak[(2, seq, fpa)]
            r1, r2 = resident[(1, seq, fpa)], resident[(2, seq, fpa)]
            print(f"{seq:>6} {fpa:>13} {one:8.2f} {two:8.2f} {one / two:8.2f} {m1:8.0f} {m2:8.0f} {m2 / m1:8.2f}"
                  f" {r1:8.0f} {r2:8.0f} {r2 / r1:8.2f} {med_cpu[(1, seq, fpa)] / med_cpu[(2, seq, fpa)]:8.2f}")
    summary = {}
    for seq in args.seqs:
        summary[f"speedup_cp2_S{seq}_fpa_on"] = med[(1, seq, "on")] / med[(2, seq, "on")]
        summary[f"fpa_on_off_cp2_S{seq}"] = med[(2, seq, "on")] / med[(2, seq, "off")]
        summary[f"fpa_on_off_blockwise_cp2_S{seq}"] = med[(2, seq, "on")] / med[(2, seq, "off_blockwise")]
        summary[f"fpa_on_off_cp1_S{seq}"] = med[(1, seq, "on")] / med[(1, seq, "off")]
        summary[f"cpu_seconds_cp1_cp2_S{seq}_fpa_on"] = med_cpu[(1, seq, "on")] / med_cpu[(2, seq, "on")]
    top = max(args.seqs)
    summary[f"memory_cp2_cp1_S{top}_fpa_on"] = peak[(2, top, "on")] / peak[(1, top, "on")]
    summary[f"rss_cp2_cp1_S{top}_fpa_on"] = resident[(2, top, "on")] / resident[(1, top, "on")]
    print("CPU 1/2: CP1's CPU seconds per step over the busier CP2 rank's (the work split, whatever the load)")
    print("\ntargets: CP1/CP2 >= 1.6, FPA on/off under CP2 <= 1.10, memory CP2/CP1 at the longest S <= 0.6 "
          "(on/off_blockwise: the penalty's own price with the kernel held fixed; on/off at CP1: the same price "
          "without CP)")
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
