"""`fpa-plan CONFIG [key=value ...] --gpus N --gpu-memory GB`: the layouts of CONFIG that fit, fastest first.

Every layout the config check accepts on N GPUs (TP within a node, PP, VP, CP, DP, SP, ZeRO stage, recompute,
micro-batch size) gets its per-GPU memory term by term (fpa_megatron/model/memory.py) and an estimated step
time (planner/time.py); the ones whose total fits in --gpu-memory are listed. Exit status 1 when none fits,
2 for a bad argument or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from fpa_megatron.config import ConfigError, load_config
from fpa_megatron.model.memory import ALLOCATOR_FRACTION, FIXED_RESERVE_BYTES, GIB
from fpa_megatron.planner.time import Hardware

MEMORY_COLUMNS = ("weights", "gradients", "master_fp32", "adam_moments", "fp32_gradient_partition", "activations",
                  "margin", "total")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _links(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected INTRA,INTER (Gbit/s per GPU, e.g. 3600,400), got {text!r}")
    return tuple(_positive(float)(p) for p in parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpa-plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (e.g. configs/gpt_7b.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for fpa-train")
    parser.add_argument("--gpus", type=_positive(int), required=True, help="GPUs in total")
    parser.add_argument("--gpu-memory", type=_positive(float), required=True, help="memory per GPU, GiB")
    parser.add_argument("--gpus-per-node", type=_positive(int), default=Hardware.gpus_per_node,
                        help="TP stays inside a node; groups larger than a node use the inter-node link")
    parser.add_argument("--gpu-tflops", type=_positive(float), default=None,
                        help="dense peak TFLOP/s per GPU (default: the config's logging.peak_tflops)")
    parser.add_argument("--mfu", type=_fraction, default=Hardware.mfu, help="achievable fraction of the peak")
    parser.add_argument("--link-gbps", type=_links, default=(Hardware.intra_gbps, Hardware.inter_gbps),
                        metavar="INTRA,INTER", help="per-GPU link bandwidth inside / between nodes, Gbit/s")
    parser.add_argument("--top", type=_positive(int), default=10, help="rows in the table")
    parser.add_argument("--json", action="store_true", help="every fitting layout with every term, as JSON")
    return parser


def _gb(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_table(result: dict, top: int) -> str:
    hw = result["hardware"]
    fitting = [r for r in result["layouts"] if r["fits"]]
    lines = [f"{len(fitting)} of {len(result['layouts'])} layouts fit on {result['gpus']} GPUs of "
             f"{result['gpu_memory_gb']:g} GiB (GiB per GPU; step time at {hw.mfu:.0%} of {hw.tflops:g} TFLOP/s, "
             f"links {hw.intra_gbps:g}/{hw.inter_gbps:g} Gbit/s; margin = {ALLOCATOR_FRACTION:.0%} of the tensors "
             f"+ {FIXED_RESERVE_BYTES / GIB:g} GiB)"]
    header = ["layout", "m", "weights", "grads", "master", "adam", "fp32 grad", "activ.", "margin", "total",
              "step s", "bubble", "comm s", "tok/s"]
    rows = []
    for r in fitting[:top]:
        mem, t = r["memory"], r["time"]
        comm = t["tp_comm_s"] + t["cp_comm_s"] + t["pp_comm_s"] + t["dp_comm_s"]
        rows.append([r["name"], str(r["layout"].num_microbatches), *(_gb(mem[k]) for k in MEMORY_COLUMNS),
                     f"{t['step_s']:.2f}", f"{t['bubble_s'] / t['step_s']:.0%}", f"{comm:.2f}",
                     f"{t['tokens_per_s']:.0f}"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    if fitting and fitting[0]["memory"]["host_checkpoint_staging"]:
        lines.append(f"host memory (not GPU) per rank for checkpoint.async_save staging: "
                     f"{_gb(fitting[0]['memory']['host_checkpoint_staging'])} GiB under {fitting[0]['name']} "
                     f"(checkpoint.async_save=false: none)")
    if result["rejected_by_config_checks"]:
        lines.append("not offered (config_checks rejects them): " + "; ".join(
            f"{n} x {reason}" for reason, n in sorted(result["rejected_by_config_checks"].items())))
    return "\n".join(lines)


def to_json(result: dict) -> dict:
    return {
        "gpus": result["gpus"], "gpu_memory_gb": result["gpu_memory_gb"], "hardware": asdict(result["hardware"]),
        "margin": {"allocator_fraction": ALLOCATOR_FRACTION, "fixed_reserve_bytes": FIXED_RESERVE_BYTES},
        "layouts": [{"name": r["name"], "layout": asdict(r["layout"]), "memory_bytes": r["memory"],
                     "time": r["time"]} for r in result["layouts"] if r["fits"]],
        "rejected_by_config_checks": result["rejected_by_config_checks"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options
    from fpa_megatron.planner.search import plan  # the config check it runs imports torch: not for --help

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    hw = Hardware(gpus_per_node=args.gpus_per_node, tflops=args.gpu_tflops or cfg.logging.peak_tflops,
                  mfu=args.mfu, intra_gbps=args.link_gbps[0], inter_gbps=args.link_gbps[1])
    try:
        result = plan(cfg, args.gpus, args.gpu_memory, hw)
    except ConfigError as err:
        parser.error(str(err))
    if not result["layouts"]:
        reasons = "; ".join(sorted(result["rejected_by_config_checks"]))
        parser.error(f"no layout of {args.config} is accepted on {args.gpus} GPUs ({reasons})")
    if args.json:
        print(json.dumps(to_json(result), indent=1))
    else:
        print(format_table(result, args.top))
    if not any(r["fits"] for r in result["layouts"]):
        print(f"fpa-plan: no layout fits in {args.gpu_memory:g} GiB per GPU", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
