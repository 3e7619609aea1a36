"""Throughput of `fpa-prep encode` with 1 and 2 workers against sentencepiece alone.

Generates a JSON Lines corpus of at least --mb MiB (default 56) from slices of the built-in standard
library corpus (seeded), trains an 8192-piece BPE tokenizer on it, then measures:
  floor:     sentencepiece's encoder over the same documents in a tight loop (texts already in memory)
  encode/1:  run_encode with 1 worker   (end to end: scan + checksum, spawn, tokenize, write, commit)
  encode/2:  run_encode with 2 workers
and prints tokens/s, the 2-vs-1 scaling ratio (target >= 1.8) and encode/1 against the floor (target:
within 10%). The machine load average is printed too: other processes on the cores skew the figures.

    python benchmarks/prep_throughput.py [--mb 56] [--workdir DIR] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.builtin_corpus import gather  # noqa: E402
from data_prep.encode import EncodeOptions, run_encode  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402


def make_corpus(path: str, mib: float, seed: int) -> tuple[int, int]:
    """Documents of 1-16 KiB cut at random places from the stdlib corpus until `mib` MiB are written."""
    source = "".join(d["text"] for d in gather(8 << 20))
    rng = random.Random(seed)
    target = int(mib * (1 << 20))
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = rng.randint(1 << 10, 16 << 10)
            start = rng.randrange(0, len(source) - n)
            line = json.dumps({"text": source[start : start + n]}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return written, docs


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_encode(corpus: str, model: str, out_dir: str, workers: int, shards: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the parent and its workers, tokens) of one run_encode."""
    shutil.rmtree(out_dir, ignore_errors=True)
    opts = EncodeOptions(inputs=[corpus], tokenizer=model, out_dir=out_dir, name="bench", num_shards=shards,
                         workers=workers, progress=False)
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        manifest, _ = run_encode(opts)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0 + children_cpu() - k0
    return wall, cpu, manifest["datasets"]["text"]["tokens"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=56.0, help="corpus size in MiB (>= 50 for the targets)")
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temp dir, removed)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the three measurements; best of each")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="prep-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        corpus = os.path.join(work, "corpus.jsonl")
        t0 = time.perf_counter()
        size, docs = make_corpus(corpus, args.mb, args.seed)
        print(f"corpus: {size / (1 << 20):.1f} MiB, {docs:,} documents ({time.perf_counter() - t0:.1f} s)")
        texts = read_texts(corpus)
        model_prefix = os.path.join(work, "tok")
        t0 = time.perf_counter()
        train_tokenizer(texts[:2000], model_prefix, vocab_size=8192, sample_size=200_000, seed=args.seed)
        print(f"tokenizer: 8192 BPE pieces ({time.perf_counter() - t0:.1f} s)")

        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
        load_before = os.getloadavg()[0]
        # interleaved rounds (loop, 1 worker, 2 workers) so that load changes hit all three alike; best of each
        floor_s = floor_cpu = float("inf")
        wall = {1: float("inf"), 2: float("inf")}
        cpu = dict(wall)
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            floor_tokens = 0
            for text in texts:
                floor_tokens += len(sp.encode(text))
            floor_s = min(floor_s, time.perf_counter() - t0)
            floor_cpu = min(floor_cpu, time.process_time() - c0)
            floor_tokens += len(texts)  # encode also writes one EOD per document
            for workers in (1, 2):
                w, c, tokens = time_encode(corpus, model_prefix + ".model", os.path.join(work, f"out{workers}"),
                                           workers, args.shards)
                assert tokens == floor_tokens, (tokens, floor_tokens)
                wall[workers], cpu[workers] = min(wall[workers], w), min(cpu[workers], c)

        rate = lambda s: floor_tokens / s  # noqa: E731
        ratio = wall[1] / wall[2]
        gap = wall[1] / floor_s - 1.0
        load = os.getloadavg()
        print(f"tokens: {floor_tokens:,}; cores available: {len(os.sched_getaffinity(0))}; 1-min load average "
              f"{load_before:.2f} before, {load[0]:.2f} after (other processes on these cores skew the figures)")
        print(f"                      wall s   tokens/s (wall)   CPU s (all processes)")
        print(f"sentencepiece loop : {floor_s:7.2f}  {rate(floor_s):>14,.0f}   {floor_cpu:7.2f}")
        for w in (1, 2):
            print(f"encode, {w} worker{'s' if w > 1 else ' '} : {wall[w]:7.2f}  {rate(wall[w]):>14,.0f}   {cpu[w]:7.2f}")
        print(f"encode 1 worker vs the loop: {gap * 100:+.1f}% wall time (target <= +10%: "
              f"{'PASS' if gap <= 0.10 else 'FAIL'}); {cpu[1] / floor_cpu * 100 - 100:+.1f}% CPU time")
        print(f"scaling 2 vs 1 workers: {ratio:.2f}x wall (target >= 1.8x: {'PASS' if ratio >= 1.8 else 'FAIL'})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
