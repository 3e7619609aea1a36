#!/usr/bin/env bash
# The CPU demo, from a fresh machine: set up, prepare the built-in corpus (Python's standard library:
# tokenizer + Megatron shards), then train configs/demo_cpu.yaml on 2 gloo ranks with FPA on.
# Extra arguments are config overrides, e.g.  bash scripts/demo.sh train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
DATA=data/demo

echo "== 1/3 built-in corpus: Python standard library source and docstrings -> $DATA/corpus"
[ -f "$DATA/corpus/stdlib.jsonl" ] || fpa-prep corpus --out "$DATA/corpus"

echo "== 2/3 sentencepiece tokenizer (BPE, 8192) and indexed shards -> $DATA/tokenizer, $DATA/shards"
[ -f "$DATA/tokenizer/spm.model" ] || fpa-prep tokenizer --input "$DATA/corpus/stdlib.jsonl" \
    --out "$DATA/tokenizer/spm" --vocab-size 8192 --seed 1234
# resumable: a rerun skips finished shards; then the shards are merged into one prefix, data/demo/shards/stdlib
fpa-prep encode --input "$DATA/corpus/stdlib.jsonl" --tokenizer "$DATA/tokenizer/spm.model" \
    --out-dir "$DATA/shards" --name stdlib --num-shards 2 --workers 2
[ -f "$DATA/shards/stdlib.idx" ] || fpa-prep merge "$DATA/shards"

echo "== 3/3 training configs/demo_cpu.yaml on 2 CPU ranks (data parallel, ZeRO-1, FPA on)"
bash launch/torchrun.sh --nproc-per-node 2 configs/demo_cpu.yaml "$@"

echo
echo "TensorBoard logs are in runs/demo_cpu. To watch them:"
echo "    tensorboard --logdir runs      # then open http://localhost:6006"
