#!/usr/bin/env bash
# One GPU node: GPUS processes (default: all visible GPUs), e.g.
#   examples/scripts/train_1node_gpu.sh examples/configs/moue_1b_gpu.yaml parallel.ep=8
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
torchrun --standalone --nproc_per_node="$gpus" -m moue.cli --config "$config" "$@"
