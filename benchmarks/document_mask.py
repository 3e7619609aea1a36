"""Document masking (`data.document_mask`): what the masked attention costs against the unmasked one.

1. One layer's penalized attention, forward + backward (batch 1, 4 heads, head dim 64, float32, blockwise kernel,
   FPA penalty on the probabilities), at S = 8192, with document lengths drawn from a geometric distribution of
   mean 512 and of mean 2048. Printed: masked / unmasked time (median of paired rounds, interleaved), next to the
   ideal ratio sum(len^2) / S^2 of the drawn documents (the share of the causal work that stays), and the peak
   of live tensor bytes (`LiveTensorBytes`) of both. Targets: masked time <= 1.5 x ideal + 0.05 of unmasked;
   masked peak <= unmasked peak.
2. The same with the penalty off: the blockwise kernel without the penalty (what `auto` runs for documents) against
   torch's SDPA given the explicit [S, S] document mask (the only way SDPA masks documents on CPU), and SDPA
   causal without documents for scale.
3. Context parallelism (--cp): CP2 on two gloo ranks at S = 32768 (--cp-seq), masked / unmasked per rank.
4. Training (--train): `train(cfg)` of the demo model (4 layers, hidden 128) at S = 4096 on data of documents of
   mean 512 tokens, tokens/s masked / unmasked (single process, a few steps, the first dropped).

    python benchmarks/document_mask.py [--seq 8192] [--rounds 3] [--threads 1] [--cp] [--cp-seq 32768] [--train]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from fpa_megatron.attention.blockwise import blockwise_attention
from fpa_megatron.attention.documents import document_mask
from fpa_megatron.model.live_memory import LiveTensorBytes

HEADS, HEAD_DIM = 4, 64


def draw_documents(seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    """[1, seq] document ids of documents with geometric lengths of the given mean (the last one cut at seq)."""
    rng = np.random.default_rng(seed)
    ids, doc, pos = np.empty(seq, dtype=np.int64), 0, 0
    while pos < seq:
        n = int(rng.geometric(1.0 / mean))
        ids[pos:pos + n] = doc
        pos += n
        doc += 1
    return torch.from_numpy(ids[:seq])[None]


def ideal_ratio(docs: torch.Tensor) -> float:
    lengths = torch.bincount(docs[0]).double()
    return float((lengths ** 2).sum() / docs.shape[1] ** 2)


def inputs(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, HEADS, seq, HEAD_DIM, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], dout


def step(q, k, v, dout, docs, penalty: bool, kernel: str = "blockwise") -> None:
    scale = HEAD_DIM ** -0.5
    for t in (q, k, v):
        t.grad = None
    if kernel == "sdpa":  # no penalty: torch's fused attention, causal or with the explicit document mask
        if docs is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            visible = ~document_mask(docs, docs) & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        loss = (out * dout).sum()
    else:
        out, row_penalty = blockwise_attention(q, k, v, scale, compute_penalty=penalty, document_ids=docs)
        loss = (out * dout).sum() + (row_penalty.sum() if row_penalty is not None else 0)
    loss.backward()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bytes(fn) -> int:
    with LiveTensorBytes() as live:
        fn()
    return live.peak


def verdict(ok: bool) -> str:
    return "[met]" if ok else "[MISSED]"


def kernel_comparison(seq: int, rounds: int) -> bool:
    (q, k, v), dout = inputs(seq)
    all_met = True
    print(f"1. penalized blockwise attention, fwd + bwd, S = {seq}, {HEADS} heads x d {HEAD_DIM}, float32")
    print(f"{'docs mean':>10} {'docs':>5} {'ideal':>7} {'masked/unmasked time':>21} {'target':>8} "
          f"{'peak masked':>12} {'peak unmasked':>14}")
    for mean in (512, 2048):
        docs = draw_documents(seq, mean)
        ideal = ideal_ratio(docs)
        step(q, k, v, dout, docs, True)  # warm up
        ratios = []
        for r in range(rounds):  # paired and interleaved: noise hits both alike
            order = (docs, None) if r % 2 == 0 else (None, docs)
            times = {id(d): timed(lambda d=d: step(q, k, v, dout, d, True)) for d in order}
            ratios.append(times[id(docs)] / times[id(None)])
        ratio = statistics.median(ratios)
        masked_peak = peak_bytes(lambda: step(q, k, v, dout, docs, True))
        unmasked_peak = peak_bytes(lambda: step(q, k, v, dout, None, True))
        target = 1.5 * ideal + 0.05
        met = ratio <= target and masked_peak <= unmasked_peak
        all_met &= met
        print(f"{mean:>10} {int(docs.max()) + 1:>5} {ideal:>7.3f} {ratio:>14.3f} {verdict(ratio <= target):>6} "
              f"{target:>8.3f} {masked_peak / 2**20:>9.1f} MiB {unmasked_peak / 2**20:>10.1f} MiB "
              f"{verdict(masked_peak <= unmasked_peak)}")
    return all_met


def no_penalty_comparison(seq: int, rounds: int) -> None:
    (q, k, v), dout = inputs(seq)
    docs = draw_documents(seq, 512)
    cases = {"blockwise, documents, no penalty": lambda: step(q, k, v, dout, docs, False),
             "SDPA with the [S, S] document mask": lambda: step(q, k, v, dout, docs, False, "sdpa"),
             "SDPA causal, no documents": lambda: step(q, k, v, dout, None, False, "sdpa")}
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    base = statistics.median(times["SDPA with the [S, S] document mask"])
    print(f"\n2. penalty off, S = {seq}, documents of mean 512 (ideal {ideal_ratio(docs):.3f}): time / SDPA with the mask")
    for name, values in times.items():
        print(f"   {name:<36} {statistics.median(values) / base:6.3f}")
    fastest = min(times, key=lambda n: statistics.median(times[n]) if "no documents" not in n else float("inf"))
    print(f"   fastest exact path with documents on CPU: {fastest} "
          f"{verdict(fastest.startswith('blockwise'))} (what model.attention_impl=auto runs)")


def _cp_rank(seq: int, mean: int):
    import torch.distributed as dist

    from fpa_megatron.attention.context_parallel import context_parallel_attention
    from fpa_megatron.parallel.context import cp_chunk_bounds

    torch.set_num_threads(1)
    group, rank = dist.group.WORLD, dist.get_rank()
    (q, k, v), dout = inputs(seq)
    (a0, a1), (b0, b1) = cp_chunk_bounds(seq, 2, rank)
    local = [torch.cat([t[:, :, a0:a1], t[:, :, b0:b1]], dim=2).detach().requires_grad_() for t in (q, k, v)]
    dout = torch.cat([dout[:, :, a0:a1], dout[:, :, b0:b1]], dim=2)
    docs = draw_documents(seq, mean)
    times = {}
    for name, d in (("masked", docs), ("unmasked", None)):
        dist.barrier()
        start = time.perf_counter()
        out, penalty = context_parallel_attention(*local, HEAD_DIM ** -0.5, cp_group=group, block_size=64,
                                                  document_ids=d)
        ((out * dout).sum() + penalty.sum()).backward()
        times[name] = time.perf_counter() - start
    return times, ideal_ratio(docs)


def cp_comparison(seq: int) -> bool:
    from fpa_megatron.testing import run_distributed

    results = run_distributed(_cp_rank, 2, seq, 512, timeout_s=3600)
    ideal = results[0][1]
    ratio = max(r[0]["masked"] for r in results) / max(r[0]["unmasked"] for r in results)
    target = 1.5 * ideal + 0.05
    print(f"\n3. CP2, S = {seq}, documents of mean 512: masked / unmasked (slowest rank) {ratio:.3f} "
          f"against ideal {ideal:.3f}: {verdict(ratio <= target)} (target {target:.3f})")
    return ratio <= target


def _write_documents(prefix: str, tokens: int, mean: int, vocab: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(1)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    written = 0
    while written < tokens:
        n = int(rng.geometric(1.0 / mean))
        builder.add_item(torch.from_numpy(np.concatenate([rng.integers(0, vocab - 1, n), [vocab - 1]])))
        builder.end_document()
        written += n + 1
    builder.finalize(prefix + ".idx")


def _train_rank(values: dict, overrides: list):
    from fpa_megatron.config import config_from_dict
    from fpa_megatron.training.trainer import train

    history = train(config_from_dict(values, overrides))
    return statistics.median(h["tokens_per_s"] for h in history[1:])


def train_comparison(seq: int = 4096) -> None:
    from fpa_megatron.testing import run_distributed

    with tempfile.TemporaryDirectory() as root:
        vocab = 512
        _write_documents(os.path.join(root, "docs"), 40 * seq, 512, vocab)
        values = {"model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "ffn_hidden_size": 512,
                            "seq_length": seq, "vocab_size": vocab, "position_embedding": "learned"},
                  "data": {"prefixes": [os.path.join(root, "docs")], "split": "100,0,0"},
                  "train": {"steps": 4, "micro_batch_size": 1, "global_batch_size": 1, "eval_interval": 0},
                  "checkpoint": {"save_at_end": False, "resume": "none", "dir": os.path.join(root, "ckpt")},
                  "logging": {"dir": root, "interval": 1, "tensorboard": False}}
        speed = {mask: run_distributed(_train_rank, 1, values, [f"data.document_mask={str(mask).lower()}"],
                                       timeout_s=3600)[0] for mask in (True, False)}
    print(f"\n4. train(cfg), demo model at S = {seq}, documents of mean 512: tokens/s masked / unmasked "
          f"{speed[True] / speed[False]:.2f} ({speed[True]:.0f} / {speed[False]:.0f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cp", action="store_true", help="also CP2 on two gloo ranks at --cp-seq")
    parser.add_argument("--cp-seq", type=int, default=32768)
    parser.add_argument("--train", action="store_true", help="also train(cfg) of the demo model at S = 4096")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    met = kernel_comparison(args.seq, args.rounds)
    no_penalty_comparison(args.seq, args.rounds)
    if args.cp:
        met &= cp_comparison(args.cp_seq)
    if args.train:
        train_comparison()
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
