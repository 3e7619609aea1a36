"""Peak memory and time of one penalized attention layer: eager against blockwise (issue 5).

Forward + backward of the core attention alone, batch 1, 8 heads, head dim 64, float32, causal, FPA penalty
on the post-softmax probabilities (the loss is sum(out * dout) + sum(row_penalty), so both gradients flow),
at S = 1024, 2048, 4096, 8192. Cases: `eager` (explicit [b, h, s, s] scores), `blockwise` (tiled, penalty on),
`blockwise_off` (tiled, compute_penalty=False) and, timed only, `sdpa` (torch's fused attention, no penalty:
what `attention_impl: auto` runs when the penalty is off), so `bw / sdpa` is the price of the penalized
kernel against the fastest unpenalized one.

Peak memory (CPU, where torch has no max_memory_allocated): every (S, case) runs in a fresh subprocess that
builds the inputs, warms the libraries up at a small S, then resets the kernel's resident-set high-water
mark (`echo 5 > /proc/self/clear_refs`), runs one forward + backward and reads VmHWM from /proc/self/status.
Reported: VmHWM minus the resident set just before the step, i.e. the extra memory the step made resident
(activations, temporaries, gradients; not the inputs, the interpreter or the libraries). It is what the
operating system charges for the step, including glibc's free-list slack, so it is an upper bound of the
tensors' own peak; other processes on the machine do not affect it.

Time: all cases run in this one process, interleaved round by round (alternating order), so machine noise
hits them alike; the table shows medians, and the penalty's on/off as the median [min..max] of the
per-round ratios (paired; eager at S = 8192 runs only 2 of the rounds). Targets (issue 5): blockwise peak <= 1/4 of eager
at S = 4096; blockwise peak S = 8192 over S = 4096 <= 2.2 (linear); blockwise time <= 1.0x eager at
S >= 2048; penalty on / off within blockwise <= 1.10x.

    python benchmarks/attention_memory.py [--seqs 1024 2048 4096 8192] [--block-size 64] [--rounds 5]
        [--threads 2] [--batch 1] [--head-dim 64] [--skip-memory] [--skip-time]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from fpa_megatron.attention.blockwise import DEFAULT_BLOCK_SIZE, blockwise_attention
from fpa_megatron.attention.reference import eager_attention

BATCH, HEADS, HEAD_DIM = 1, 8, 64
CASES = ("eager", "blockwise", "blockwise_off", "sdpa")


def make_inputs(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, seq, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(shape, generator=g)
    return q, k, v, dout


def step(case: str, q, k, v, dout, block_size: int) -> None:
    """One forward + backward of the attention layer; gradients land in q.grad, k.grad, v.grad."""
    scale = q.shape[-1] ** -0.5
    if case == "eager":
        out, row_penalty = eager_attention(q, k, v, scale)
    elif case == "sdpa":  # torch's fused attention without the penalty: what `auto` runs with FPA off
        out, row_penalty = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), None
    else:
        out, row_penalty = blockwise_attention(q, k, v, scale, block_size=block_size,
                                               compute_penalty=case == "blockwise")
    loss = (out * dout).sum()
    if row_penalty is not None:
        loss = loss + row_penalty.sum()
    loss.backward()
    q.grad = k.grad = v.grad = None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_peak(case: str, seq: int, block_size: int) -> None:
    """Subprocess body: print the extra resident memory (MiB) of one step as JSON."""
    step(case, *make_inputs(256, seed=1), block_size)  # load and initialize the libraries
    inputs = make_inputs(seq)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    step(case, *inputs, block_size)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def measure_peak(case: str, seq: int, block_size: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", case, str(seq), "--block-size", str(block_size),
           "--batch", str(BATCH), "--head-dim", str(HEAD_DIM)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def measure_times(seqs, rounds: int, block_size: int) -> tuple[dict, dict]:
    """Median seconds per (seq, case), and per seq the penalty's on/off ratio as the median [min, max] of the
    per-round ratios (paired: both run back to back, so a slow spell of a shared machine hits them alike).
    The cases of one seq alternate order round by round; at S > 4096 eager (seconds per step) runs 2 rounds."""
    times, on_off = {}, {}
    for seq in seqs:
        inputs = make_inputs(seq)
        for case in CASES:  # warm-up
            step(case, *inputs, block_size)
        samples = {case: [] for case in CASES}
        for r in range(rounds):
            cases = CASES if seq <= 4096 or r < 2 else CASES[1:]
            for case in (cases if r % 2 == 0 else reversed(cases)):
                t0 = time.perf_counter()
                step(case, *inputs, block_size)
                samples[case].append(time.perf_counter() - t0)
        for case in CASES:
            times[seq, case] = statistics.median(samples[case])
        ratios = [on / off for on, off in zip(samples["blockwise"], samples["blockwise_off"])]
        on_off[seq] = (statistics.median(ratios), min(ratios), max(ratios))
        print(f"  timed S={seq}: " + ", ".join(f"{c} {times[seq, c]:.3f}s" for c in CASES), flush=True)
    return times, on_off


def _ratio(paired) -> str:
    return "-" if paired is None else f"{paired[0]:.2f} [{paired[1]:.2f}..{paired[2]:.2f}]"


def main():
    global BATCH, HEAD_DIM  # --batch, --head-dim
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    BATCH, HEAD_DIM = args.batch, args.head_dim
    torch.set_num_threads(args.threads)
    if args.child:
        child_peak(args.child[0], int(args.child[1]), args.block_size)
        return

    print(f"attention layer fwd+bwd: batch {BATCH}, {HEADS} heads, head dim {HEAD_DIM}, float32, causal, "
          f"penalty on probs; blockwise block {args.block_size}; {args.threads} threads", flush=True)
    peaks = {}
    if not args.skip_memory:
        for seq in args.seqs:
            for case in ("eager", "blockwise"):
                peaks[seq, case] = measure_peak(case, seq, args.block_size, args.threads)
            print(f"  peak S={seq}: eager {peaks[seq, 'eager']:.1f} MiB, blockwise {peaks[seq, 'blockwise']:.1f} MiB",
                  flush=True)
    times, on_off = ({}, {}) if args.skip_time else measure_times(args.seqs, args.rounds, args.block_size)

    def fmt(x, spec):
        width = int(spec.split(".")[0])
        return format(x, spec) if x is not None else "-".rjust(width)

    print()
    print("|     S | eager peak MiB | blockwise peak MiB | peak bw/eager | eager s | blockwise s | time bw/eager "
          "| bw penalty off s | bw on/off (paired) | sdpa s | bw / sdpa |")
    print("|------:|---------------:|-------------------:|--------------:|--------:|------------:|--------------:"
          "|-----------------:|-------------------:|-------:|----------:|")
    for seq in args.seqs:
        pe, pb = peaks.get((seq, "eager")), peaks.get((seq, "blockwise"))
        te, tb, to, ts = (times.get((seq, c)) for c in CASES)
        print(f"| {seq:5d} | {fmt(pe, '14.1f')} | {fmt(pb, '18.1f')} | {fmt(pb / pe if pe else None, '13.3f')} "
              f"| {fmt(te, '7.3f')} | {fmt(tb, '11.3f')} | {fmt(tb / te if te else None, '13.2f')} "
              f"| {fmt(to, '16.3f')} | {_ratio(on_off.get(seq)):>18s} | {fmt(ts, '6.3f')} "
              f"| {fmt(tb / ts if ts else None, '9.2f')} |")

    print("\ntargets:")
    checks = []
    if (4096, "eager") in peaks:
        r = peaks[4096, "blockwise"] / peaks[4096, "eager"]
        checks.append((f"peak blockwise/eager at S=4096 = {r:.3f} <= 0.25", r <= 0.25))
    if (8192, "blockwise") in peaks and (4096, "blockwise") in peaks:
        r = peaks[8192, "blockwise"] / peaks[4096, "blockwise"]
        checks.append((f"blockwise peak S=8192 / S=4096 = {r:.2f} <= 2.2", r <= 2.2))
    for seq in args.seqs:
        if times and seq >= 2048:
            r = times[seq, "blockwise"] / times[seq, "eager"]
            checks.append((f"time blockwise/eager at S={seq} = {r:.2f} <= 1.0", r <= 1.0))
    for seq in args.seqs:
        if times:
            r = on_off[seq][0]
            checks.append((f"blockwise penalty on/off at S={seq} = {r:.2f} (paired median) <= 1.10", r <= 1.10))
    for text, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")


if __name__ == "__main__":
    main()
