#!/usr/bin/env bash
# The day a GPU is lent: the GPU tests and the speed benchmark on one GPU, in the GPU image
# (docker/, NGC PyTorch with Transformer Engine and apex). Prints both tables (the GPU tests'
# figures with their bounds, and the speed table) and keeps the logs in OUT_DIR.
#   benchmarks/gpu_day.sh [OUT_DIR]      default: gpu_day_<date>
# docs/gpu.md says what each figure checks; paste both tables into docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-gpu_day_$(date +%Y%m%d)}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } | tee "$out/gpu.txt"
start=$(date +%s)
make test-gpu 2>&1 | tee "$out/test_gpu.log"
tests=${PIPESTATUS[0]}
echo "make test-gpu: exit $tests, $(( $(date +%s) - start )) s" | tee -a "$out/test_gpu.log"
.venv/bin/python benchmarks/speed.py --nproc 1 --json "$out/speed.json" 2>&1 | tee "$out/speed.log"
speed=${PIPESTATUS[0]}
echo
echo "== GPU test figures =="
sed -n '/^GPU figures/,/^$/p' "$out/test_gpu.log"
echo "== speed (one GPU) =="
grep '^|' "$out/speed.log" || true
exit $(( tests || speed ))
