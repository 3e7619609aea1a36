"""Training throughput: the demo model across layouts, or (`--long`) long sequences against plain PyTorch.

Default mode: `train(cfg)` of configs/demo_cpu.yaml on synthetic data (data.mock) for a few steps in real
gloo processes, 1 rank against 2 ranks under TP2, PP2 and DP2 (ZeRO-1); layouts are interleaved round by
round so machine noise hits them alike. Prints the median tokens/s per layout (steps after the warm-up)
and each one's ratio to the single rank.

    python benchmarks/train_throughput.py [--rounds 2] [--steps 12] [--vocab 8192]

`--long`: one process, one thread, a GPT with 4 layers, hidden 256, 8 heads, vocab 8192, micro-batch 2 at
sequence 1024 and 2048 (synthetic tokens). Our training step (Megatron GPTModel + DeepSpeed ZeRO-1 engine +
`forward_backward` + `optimizer_step`, as `train(cfg)` runs it) against a baseline written here: a plain
PyTorch GPT of the same shape (pre-LN blocks, learned positions, GeLU MLP 4x, tied embeddings) calling
`scaled_dot_product_attention(is_causal=True)`, with torch.optim.AdamW and the same gradient clipping.
Rows: `auto` FPA off, `auto` FPA on, `eager` FPA on; each round runs every row's step once in a shuffled
order after warm-up steps, and the ratios are medians of the per-round ratios (paired, so slow drifts
of a shared machine cancel); the spread is the min..max of those per-round ratios.
Targets (issue 8): auto off >= 0.95x the baseline, auto on >= 0.90x, auto on / auto off <= 1.10.

    python benchmarks/train_throughput.py --long [--seqs 1024 2048] [--rounds 8] [--block-size 128]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from fpa_megatron.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "1 rank": (1, []),
    "TP2": (2, ["parallel.tensor=2"]),
    "PP2": (2, ["parallel.pipeline=2"]),
    "DP2 ZeRO-1": (2, ["optimizer.zero_stage=1"]),
}


def train_rank(values: dict, overrides: list[str]):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    return [h["tokens_per_s"] for h in train(config_from_dict(values, overrides))]


def layouts_main(args):
    values = yaml.safe_load((ROOT / "configs" / "demo_cpu.yaml").read_text())
    samples: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.steps={args.steps}", "train.eval_interval=0", "data.mock=true", "data.tokenizer=null",
                  f"model.vocab_size={args.vocab}", "checkpoint.save_at_end=false", "checkpoint.resume=none",
                  "logging.tensorboard=false", f"logging.interval={args.steps}", f"logging.dir={tmp}"]
        for r in range(args.rounds):
            names = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for name in names:
                world, overrides = LAYOUTS[name]
                tokens_per_s = run_distributed(train_rank, world, values, common + overrides, timeout_s=1800)[0]
                samples[name].extend(tokens_per_s[args.warmup:])
    base = statistics.median(samples["1 rank"])
    print(f"demo model (configs/demo_cpu.yaml), synthetic data, global batch {values['train']['global_batch_size']}"
          f" x seq {values['model']['seq_length']}, {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"{'layout':12s} {'tokens/s':>10s} {'vs 1 rank':>10s}")
    for name, vals in samples.items():
        med = statistics.median(vals)
        print(f"{name:12s} {med:10.0f} {med / base:10.2f}x")


# ------------------------------------------------------------------------------------------ --long

LONG_MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8",
              "model.ffn_hidden_size=1024", "model.vocab_size=8192", "train.micro_batch_size=2",
              "train.global_batch_size=2", "data.mock=true", "data.tokenizer=null"]
LONG_ROWS = {  # row -> (attention_impl, FPA on)
    "auto, FPA off": ("auto", False),
    "auto, FPA on": ("auto", True),
    "eager, FPA on": ("eager", True),
}


class PlainBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), x + MLP(LN(x)), with SDPA causal attention and a GeLU MLP."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.ln_attn, self.ln_mlp = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):  # [b, s, hidden]
        b, s, hidden = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [b, h, s, d]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, hidden))
        return x + self.fc2(F.gelu(self.fc1(self.ln_mlp(x))))


class PlainGPT(nn.Module):
    """The baseline: a GPT in plain PyTorch (learned positions, tied embeddings), mean cross-entropy loss."""

    def __init__(self, vocab: int, seq: int, layers: int, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(PlainBlock(hidden, heads, ffn) for _ in range(layers))
        self.ln_final = nn.LayerNorm(hidden)
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.normal_(param, std=0.02)

    def forward(self, tokens, labels):
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_final(x) @ self.tokens.weight.t()  # tied output layer
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def long_rank(values: dict, seq: int, rounds: int, warmup: int, overrides: list[str], clock: str, seed: int = 0):
    """Step times [s] per row and for the baseline, one process; also the attention kernels each row ran."""
    torch.set_num_threads(1)
    now = time.perf_counter if clock == "wall" else time.process_time
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.preflight import check_config
    from fpa_megatron.model.gpt import build_gpt_model, make_penalty
    from fpa_megatron.parallel.state import init_model_parallel
    from fpa_megatron.training.forward_backward import forward_backward
    from fpa_megatron.training.optimizer import build_engine, optimizer_step

    common = LONG_MODEL + [f"model.seq_length={seq}", f"model.max_position_embeddings={seq}"] + overrides
    cfgs = {impl: config_from_dict(values, common + [f"model.attention_impl={impl}"]) for impl in ("auto", "eager")}
    layout = check_config(cfgs["auto"], 1)
    init_model_parallel(1, 1, seed)
    built = {}
    for impl, cfg in cfgs.items():
        penalty = make_penalty(cfg.model, cfg.fpa)
        model = build_gpt_model(cfg.model, layout.padded_vocab_size, penalty, layout.ffn_hidden_size, seed=seed)
        built[impl] = (model, penalty, build_engine(model, cfg.optimizer, "fp32", 2, 1))
    m, o = cfgs["auto"].model, cfgs["auto"].optimizer
    plain = PlainGPT(layout.padded_vocab_size, seq, m.num_layers, m.hidden_size, m.num_attention_heads,
                     layout.ffn_hidden_size)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.vocab_size, (2, seq + 1), generator=g)
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(2, seq),
                 position_ids=torch.arange(seq).expand(2, seq))
    lam = cfgs["auto"].fpa.lambda0

    def ours(impl: str, fpa_on: bool) -> float:
        model, penalty, engine = built[impl]
        t0 = now()
        penalty.set_step(lam if fpa_on else 0.0, fpa_on)
        forward_backward(model, iter([batch]), penalty, num_microbatches=1, micro_batch_size=2, seq_length=seq,
                         engine=engine)
        optimizer_step(engine, o.lr)
        return now() - t0

    def baseline() -> float:
        t0 = now()
        plain_opt.zero_grad(set_to_none=True)
        plain(batch["tokens"], batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), o.grad_clip)
        plain_opt.step()
        return now() - t0

    steps = {"baseline": baseline, **{name: (lambda impl=impl, on=on: ours(impl, on))
                                      for name, (impl, on) in LONG_ROWS.items()}}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _, penalty, _ in built.values():
        penalty.path_calls.clear()
    times = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
    paths = {impl: dict(penalty.path_calls) for impl, (_, penalty, _) in built.items()}
    return times, paths


def _paired(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and min..max of the per-round ratios num/den."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def long_main(args):
    values = yaml.safe_load((ROOT / "configs" / "demo_cpu.yaml").read_text())
    overrides = [f"model.attention_block_size={args.block_size}"] if args.block_size else []
    print(f"GPT 4 layers, hidden 256, 8 heads, vocab 8192, micro-batch 2, fp32, 1 process, 1 thread; "
          f"{args.rounds} shuffled rounds after {args.warmup} warm-up steps; ratios = median of per-round "
          f"ratios [min..max]; {args.clock} clock", flush=True)
    for seq in args.seqs:
        times, paths = run_distributed(long_rank, 1, values, seq, args.rounds, args.warmup, overrides,
                                       args.clock, timeout_s=7200)[0]
        tokens = 2 * seq
        base = times["baseline"]
        print(f"\nsequence {seq}: baseline (plain PyTorch + SDPA + AdamW) {tokens / statistics.median(base):.0f} "
              f"tokens/s, median step {statistics.median(base):.3f} s")
        print(f"{'row':16s} {'tokens/s':>9s} {'vs baseline':>24s}")
        for name in LONG_ROWS:
            med, lo, hi = _paired(base, times[name])  # tokens/s ratio = baseline time / row time
            print(f"{name:16s} {tokens / statistics.median(times[name]):9.0f} {med:9.3f}x [{lo:.3f}..{hi:.3f}]")
        med, lo, hi = _paired(times["auto, FPA on"], times["auto, FPA off"])
        print(f"auto FPA on / off (step time) {med:.3f} [{lo:.3f}..{hi:.3f}]   (target <= 1.10)")
        print(f"attention kernels run per impl (after warm-up): {paths}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="long sequences against a plain PyTorch GPT")
    parser.add_argument("--rounds", type=int, default=None, help="default: 2 (layouts), 8 (--long)")
    parser.add_argument("--steps", type=int, default=12, help="steps per layout run (layouts mode)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (layouts mode)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048], help="sequence lengths (--long)")
    parser.add_argument("--block-size", type=int, default=None, help="model.attention_block_size (--long)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="--long: time steps by wall clock, or by the process's CPU time (steadier on a "
                             "machine other jobs load; the same thing on a quiet one, with 1 thread)")
    args = parser.parse_args()
    if args.long:
        args.rounds = args.rounds or 8
        long_main(args)
    else:
        args.rounds = args.rounds or 2
        layouts_main(args)


if __name__ == "__main__":
    main()
