"""The fused Triton FPA attention against FlashAttention (SDPA's flash backend) on one GPU (issue 8).

Forward + backward of the core attention alone: causal, bfloat16, head dim 128, batch 4 x 16 heads, at
S = 2048, 4096, 8192. Cases: `flash` (torch.nn.functional.scaled_dot_product_attention with the flash backend
forced, no penalty), `fpa` (triton_attention with the penalty on the probabilities; the backward gets an
upstream gradient for the output and for the row penalty), `fpa_off` (triton_attention, compute_penalty=False).
q, k, v are [b, s, h, d] tensors viewed as [b, h, s, d], the layout both kernels read natively.

Time: CUDA events around each step, the cases interleaved round by round (alternating order) after a warm-up
that also runs Triton's autotuning; medians. Peak memory: torch.cuda.max_memory_allocated after a reset,
minus what was allocated before the step (so: activations, saved tensors, gradients; not the inputs).
Targets: fpa / flash <= 1.3 in time; peak memory linear in S (8192 / 4096 about 2).

Before timing, the FPA output and gradients are checked against flash (bf16 tolerance): a first run on a new
GPU fails loudly rather than timing wrong kernels.

    python benchmarks/gpu_attention.py [--seqs 2048 4096 8192] [--batch 4] [--heads 16] [--kv-heads 16]
        [--head-dim 128] [--target probs] [--rounds 10] [--json out.json]
    python benchmarks/gpu_attention.py --smoke   # no GPU: the same logic on tiny CPU shapes, interpreted
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

if "--smoke" in sys.argv[1:]:  # the interpreter must be on before anything imports triton (megatron-core does)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
from fpa_megatron.attention.triton_attention import chosen_tiles, triton_attention, triton_attention_supported  # noqa: E402

CASES = ("flash", "fpa", "fpa_off")


def make_inputs(batch, heads, kv_heads, seq, head_dim, dtype, device, seed=0):
    """q [b, hq, s, d], k, v [b, hkv, s, d] (views of [b, s, h, d] storage) and upstream gradients."""
    g = torch.Generator(device=device).manual_seed(seed)

    def bshd(h):
        return torch.randn(batch, seq, h, head_dim, generator=g, device=device, dtype=dtype).transpose(1, 2)

    q, k, v = (bshd(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    grad_out = bshd(heads).detach()
    grad_penalty = torch.randn(batch, heads, seq, generator=g, device=device, dtype=torch.float32)
    return q, k, v, grad_out, grad_penalty


def step(case: str, q, k, v, grad_out, grad_penalty, target: str):
    """One forward + backward; returns (out, dq, dk, dv)."""
    scale = q.shape[-1] ** -0.5
    if case == "flash":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        outputs, grads = [out], [grad_out]
    else:
        out, row_penalty = triton_attention(q, k, v, scale, target=target, compute_penalty=case == "fpa")
        outputs, grads = [out], [grad_out]
        if row_penalty is not None:
            outputs.append(row_penalty)
            grads.append(grad_penalty)
    return (out, *torch.autograd.grad(outputs, (q, k, v), grads))


def check_against_flash(inputs, target: str, tol: float) -> str:
    """Relative max error of fpa_off (== flash's math) and fpa's output against flash; raises above tol."""
    ref = step("flash", *inputs, target)
    report = []
    for case in ("fpa_off", "fpa"):
        got = step(case, *inputs, target)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            if case == "fpa" and name != "out":
                continue  # the penalty changes the gradients
            if not torch.isfinite(a).all():
                raise RuntimeError(f"{case} {name}: non-finite values")
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            report.append(f"{case} {name} {err:.1e}")
            if err > tol:
                raise RuntimeError(f"{case} {name} differs from flash: relative error {err:.3e} > {tol}")
    return ", ".join(report)


class Timer:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def peak_mib(case, inputs, target, device):
    """Extra memory of one step over what is allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = step(case, *inputs, target)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def causal_flops(batch, heads, seq, head_dim):
    """Matmul FLOPs of causal attention forward + backward (2 matmuls forward, 5 backward, half the tiles)."""
    return 7 * 2 * batch * heads * seq * seq * head_dim / 2


def measure(args, device, dtype):
    rows = {}
    timer = Timer(device)
    for seq in args.seqs:
        inputs = make_inputs(args.batch, args.heads, args.kv_heads, seq, args.head_dim, dtype, device)
        for case in CASES:  # warm-up (and Triton's autotuning at this shape)
            for _ in range(args.warmup):
                step(case, *inputs, args.target)
        check = check_against_flash(inputs, args.target, args.tol)
        samples = {case: [] for case in CASES}
        for r in range(args.rounds):
            for case in (CASES if r % 2 == 0 else tuple(reversed(CASES))):
                samples[case].append(timer(lambda: step(case, *inputs, args.target)))
        row = {f"{case}_s": statistics.median(samples[case]) for case in CASES}
        row.update({f"{case}_peak_mib": peak_mib(case, inputs, args.target, device) for case in CASES})
        row["check"] = check
        rows[seq] = row
        print(f"  S={seq}: " + ", ".join(f"{c} {row[c + '_s'] * 1e3:.2f} ms" for c in CASES) + f"  [{check}]",
              flush=True)
        del inputs
    return rows


def report(args, rows, device_name):
    def fmt(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    print(f"\n{device_name}: batch {args.batch}, {args.heads} heads ({args.kv_heads} kv), head dim "
          f"{args.head_dim}, {args.dtype}, causal, penalty target {args.target}; medians of {args.rounds} rounds")
    print("|     S | flash ms | fpa ms | fpa off ms | fpa/flash | on/off | fpa TFLOP/s | flash peak MiB "
          "| fpa peak MiB |")
    print("|------:|---------:|-------:|-----------:|----------:|-------:|------------:|---------------:"
          "|-------------:|")
    for seq, r in rows.items():
        tflops = causal_flops(args.batch, args.heads, seq, args.head_dim) / r["fpa_s"] / 1e12
        print(f"| {seq:5d} | {r['flash_s'] * 1e3:8.2f} | {r['fpa_s'] * 1e3:6.2f} | {r['fpa_off_s'] * 1e3:10.2f} "
              f"| {r['fpa_s'] / r['flash_s']:9.2f} | {r['fpa_s'] / r['fpa_off_s']:6.2f} | {tflops:11.1f} "
              f"| {fmt(r['flash_peak_mib'], '14.1f')} | {fmt(r['fpa_peak_mib'], '12.1f')} |")

    print("\ntargets:" + (" (interpreted on CPU: these ratios say nothing about a GPU)" if args.smoke else ""))
    for seq, r in rows.items():
        ratio = r["fpa_s"] / r["flash_s"]
        print(f"  [{'met' if ratio <= 1.3 else 'MISSED'}] fpa/flash at S={seq} = {ratio:.2f} <= 1.3")
    seqs = sorted(rows)
    for small, large in zip(seqs, seqs[1:]):
        a, b = rows[small]["fpa_peak_mib"], rows[large]["fpa_peak_mib"]
        if a and b:
            growth, linear = b / a, large / small
            print(f"  [{'met' if growth <= 1.1 * linear else 'MISSED'}] fpa peak memory S={large} / S={small} = "
                  f"{growth:.2f} (linear: {linear:.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--target", choices=("probs", "logits"), default="probs")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tol", type=float, default=3e-2, help="relative error allowed against flash")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU needed: tiny shapes on CPU tensors under Triton's interpreter")
    args = parser.parse_args()
    args.kv_heads = args.kv_heads or args.heads

    if args.smoke:
        args.seqs, args.batch, args.heads, args.kv_heads, args.head_dim = [64, 128], 1, 2, 1, 32
        args.rounds, args.warmup = 2, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_attention: no CUDA device, nothing measured (--smoke runs the same logic on CPU, interpreted)")
        return 0
    else:
        device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    q, k, _, _, _ = make_inputs(1, args.heads, args.kv_heads, 16, args.head_dim, dtype, device)
    ok, reason = triton_attention_supported(q, k)
    if not ok:
        print(f"gpu_attention: the Triton kernel cannot run here: {reason}")
        return 1
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    import triton

    print(f"{device_name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = measure(args, device, dtype)
    report(args, rows, device_name)
    configs = chosen_tiles(args.head_dim, dtype)
    if configs:
        print("\nautotuned tiles (last shape): " + "; ".join(f"{k}: {v}" for k, v in configs.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "rows": rows, "configs": configs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
