#!/usr/bin/env bash
# Every benchmark on one CUDA GPU in bf16, back to back, with each one's wall time; results go to
# bench/results/cuda/ (or $1). Each script takes well under 10 minutes on an H100/H200-class card.
#
#     bash bench/cuda.sh [RESULTS_DIR]
set -euo pipefail
results=${1:-bench/results/cuda}
mkdir -p "$results"
export HF_HUB_OFFLINE=1
python -m lmdiff_ft env
for script in flops train_step decode; do
    start=$SECONDS
    python -m "bench.$script" --device cuda --dtype bfloat16 --out "$results/$script.json" | tee "$results/$script.txt"
    echo "bench.$script: $((SECONDS - start)) s wall" | tee -a "$results/$script.txt"
done
