"""Compile the FPA Triton kernels for a GPU that is not here: registers, spills and shared memory per variant.

No GPU needed: Triton compiles ahead of time for a target (`GPUTarget("cuda", 90, 64)`, H100/H200 by
default) with the ptxas it ships, and `cuobjdump --dump-resource-usage` (also shipped) reads the cubin.
This catches kernels that do not compile for the GPU (the interpreter tests run them as Python) and tiles
that spill registers (STACK > 0) before a GPU is lent. It runs nothing.

    python benchmarks/triton_compile_check.py [--dtypes bf16 fp16 fp32] [--head-dim 128] [--arch 90]

One line per (dtype, causal, penalty target, has penalty gradient, kernel, partial: a key slice with offsets,
docs: document masking) with the first tile config of `GPU_TILES` for that head dim: shared memory bytes, then
cuobjdump's REG / STACK / SHARED / LOCAL figures. `--docs only` / `--docs no` restrict the document variants.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fpa_megatron.attention import triton_kernels as kernels
from fpa_megatron.attention.triton_attention import GPU_TILES

DTYPES = {"fp32": (tl.float32, "ieee"), "fp16": (tl.float16, "tf32"), "bf16": (tl.bfloat16, "tf32")}
PENALTIES = {"none": kernels.PENALTY_NONE.value, "probs": kernels.PENALTY_PROBS.value,
             "logits": kernels.PENALTY_LOGITS.value}  # the kernels' PENALTY constexpr
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def pointer_args(dtype: str) -> dict:
    """kernel name -> (kernel, {pointer argument: Triton pointer type}); scalars default to i32 / fp32."""
    data, stats = "*" + dtype, "*fp32"
    return {
        "fwd": (kernels.attn_fwd_kernel, dict(Q=data, K=data, V=data, Out=data, Lse2=stats, RowPenalty=stats,
                                              RowLo="*i32", RowHi="*i32")),
        "dkdv": (kernels.attn_bwd_dkdv_kernel, dict(Q=data, K=data, V=data, DOut=data, Lse2=stats, Delta=stats,
                                                    GradPenalty=stats, DK=data, DV=data, ColLo="*i32", ColHi="*i32")),
        "dq": (kernels.attn_bwd_dq_kernel, dict(Q=data, K=data, V=data, DOut=data, Lse2=stats, Delta=stats,
                                                GradPenalty=stats, DQ=data, RowLo="*i32", RowHi="*i32")),
    }


def compile_kernel(fn, pointers: dict, constexprs: dict, target: GPUTarget, num_warps: int, num_stages: int):
    """(shared memory bytes, cuobjdump's resource line) of one compiled variant."""
    signature = {name: ("constexpr" if name in constexprs else
                        pointers.get(name, "fp32" if name == "softmax_scale" else "i32")) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True).stdout
    line = next((part.strip() for part in usage.splitlines() if "REG" in part), usage[-300:])
    return compiled.metadata.shared, line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--docs", choices=["both", "only", "no"], default="both",
                        help="the document-masking variants (HAS_DOCS): with the others, only them, or none")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 64)
    failures = 0
    print(f"target sm_{args.arch}, head dim {args.head_dim}; dtype causal penalty grad_penalty kernel: "
          f"shared bytes, resource usage", flush=True)
    for dtype in args.dtypes:
        dot_dtype, precision = DTYPES[dtype]
        docs_flags = {"both": (False, True), "only": (True,), "no": (False,)}[args.docs]
        cases = itertools.product((False, True), PENALTIES.items(), (False, True), pointer_args(dtype).items(),
                                  (False, True), docs_flags)
        for causal, (penalty, code), grad_penalty, (kind, (fn, pointers)), partial, docs in cases:
            if (kind == "fwd" and grad_penalty) or (code == 0 and grad_penalty):
                continue  # the forward has no penalty gradient; without a penalty there is none
            block_m, block_n, warps, stages = GPU_TILES[kind][args.head_dim][0]
            constexprs = dict(HEAD_DIM=args.head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                              PENALTY=code, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
            if kind != "fwd":
                constexprs["HAS_GRAD_PENALTY"] = grad_penalty
            constexprs["OFFSETS"] = partial  # a key slice with offsets and its own length (context parallelism)
            if kind == "fwd":
                constexprs["PARTIAL"] = partial  # the statistics that merge
            constexprs["HAS_DOCS"] = docs  # document masking: per-row key ranges
            name = (f"{dtype} causal={causal} penalty={penalty} grad_penalty={grad_penalty} {kind}"
                    + (" partial" if partial else "") + (" docs" if docs else ""))
            try:
                shared, usage = compile_kernel(fn, pointers, constexprs, target, warps, stages)
                print(f"{name}: shared {shared}, {usage}", flush=True)
            except Exception as err:  # report every variant, then fail
                failures += 1
                print(f"{name}: FAILED {type(err).__name__}: {str(err)[:500]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
