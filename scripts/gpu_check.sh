#!/usr/bin/env bash
# First contact with a GPU, in one script (under 8 minutes on one CUDA GPU):
#   1. the CUDA-only tests (Triton kernel, blockwise attention on CUDA), autotuning off;
#   2. benchmarks/gpu_attention.py (Triton FPA vs FlashAttention, fwd + bwd, S = 2048 / 4096);
#   3. configs/gpt_125m.yaml for 50 steps in bf16 on mock data with FPA on (Triton) and off (SDPA / flash):
#      tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated) against fpa-plan's prediction.
# All figures go into one JSON: $OUT/gpu_check.json when OUT is set, else runs/gpu_check.json.
#
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --check    # no GPU needed: the files it runs exist, the predictions run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

CONFIG=configs/gpt_125m.yaml
STEPS="${GPU_CHECK_STEPS:-50}"
DEST="${OUT:-runs}"
JSON="$DEST/gpu_check.json"
PY="${PYTHON:-python3}"

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "gpu_check.sh: unknown argument $1 (use no argument, or --check)" >&2; exit 2 ;;
esac

for path in tests/model/test_triton_attention.py tests/model/test_blockwise_attention.py \
            benchmarks/gpu_attention.py benchmarks/gpu_train_check.py "$CONFIG"; do
  [[ -f "$path" ]] || { echo "gpu_check.sh: $path is missing" >&2; exit 2; }
done

if [[ "$check_only" == 1 ]]; then
  "$PY" -m fpa_megatron.planner.cli "$CONFIG" --gpus 1 --gpu-memory 80 --top 3
  for fpa in on off; do
    "$PY" benchmarks/gpu_train_check.py --config "$CONFIG" --fpa "$fpa" --steps "$STEPS" --predict-only
  done
  echo "gpu_check.sh --check: everything the GPU run calls is present; the predictions ran"
  exit 0
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device is available (torch.cuda.is_available() is False): nothing checked" >&2
  exit 3
fi

mkdir -p "$DEST"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "== 1/3 CUDA-only tests"
tests_rc=0
FPA_TRITON_AUTOTUNE=0 "$PY" -m pytest -q tests/model/test_triton_attention.py \
  "tests/model/test_blockwise_attention.py" -k "cuda or triton" || tests_rc=$?

echo "== 2/3 benchmarks/gpu_attention.py"
attention_rc=0
"$PY" benchmarks/gpu_attention.py --seqs 2048 4096 --rounds 5 --json "$work/attention.json" || attention_rc=$?

echo "== 3/3 $CONFIG, $STEPS steps, bf16, FPA on and off"
train_rc=0
for fpa in on off; do
  "$PY" benchmarks/gpu_train_check.py --config "$CONFIG" --fpa "$fpa" --steps "$STEPS" \
    --json "$work/train_$fpa.json" || train_rc=$?
done

"$PY" - "$work" "$JSON" "$tests_rc" "$attention_rc" "$train_rc" "$((SECONDS - start))" <<'EOF'
import json, os, sys
work, dest, tests_rc, attention_rc, train_rc, seconds = sys.argv[1:]
def read(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None
result = {"cuda_tests_rc": int(tests_rc), "gpu_attention_rc": int(attention_rc), "train_rc": int(train_rc),
          "seconds": int(seconds), "gpu_attention": read("attention.json"),
          "train_fpa_on": read("train_on.json"), "train_fpa_off": read("train_off.json")}
with open(dest, "w") as f:
    json.dump(result, f, indent=1)
for case in ("train_fpa_on", "train_fpa_off"):
    r = result[case]
    if r and "tokens_per_s" in r:
        print(f"{case}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}, peak {r['peak_memory_gb']:.2f} GiB "
              f"vs predicted {r['predicted_tensor_gb']:.2f} GiB (ratio {r['peak_over_predicted']:.2f})")
print(f"gpu_check: {dest} written after {seconds} s")
EOF
if (( tests_rc || attention_rc || train_rc )); then
  echo "gpu_check.sh: FAILED (tests rc $tests_rc, gpu_attention rc $attention_rc, training rc $train_rc)" >&2
  exit 1
fi
echo "gpu_check.sh: all passed"
