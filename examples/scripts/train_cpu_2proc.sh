#!/usr/bin/env bash
# The CPU quickstart: a small rotational MoUE on 2 CPU processes (EP=2), on mock data unless
# a dataset is given: DATA=data/stdlib examples/scripts/train_cpu_2proc.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
data=(); [ -n "${DATA:-}" ] && data=(data.mock=false "data.path=$DATA" data.tokenizer=byte)
CUDA_VISIBLE_DEVICES= TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 \
  torchrun --standalone --nproc_per_node=2 -m moue.cli \
  --config examples/configs/tiny_cpu.yaml "${data[@]}" "$@"
