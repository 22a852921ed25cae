#!/usr/bin/env bash
# SFT vs CWAC on the `small` setting in bf16 on one GPU, side by side: step-time and memory ratios, CWAC's one-off
# preparation time and what `safeft estimate` predicted, written to benchmarks/results/gpu/ (gpu_check.json, .md).
# One command, ≈ 3–5 min on one H200 (budget: 10 min):
#
#     bash benchmarks/gpu_check.sh                  # on the GPU machine
#     bash benchmarks/gpu_check.sh --tiny --out /tmp/gpu   # anywhere: tiny model, checks the script only
#
# SAFEFT_GPU_CHECK_TINY=1 is the same as --tiny. Extra arguments go to benchmarks/gpu_check.py (--steps, --repeats,
# --model <preset or config.json>, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
args=("$@")
if [[ "${SAFEFT_GPU_CHECK_TINY:-0}" == "1" ]]; then
    args+=(--tiny)
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python3 benchmarks/gpu_check.py "${args[@]}"
