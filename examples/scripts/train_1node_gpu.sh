#!/usr/bin/env bash
# One GPU node: GPUS processes (default: all visible GPUs), e.g.
#   examples/scripts/train_1node_gpu.sh examples/configs/moue_1b_gpu.yaml parallel.ep=8
# SIGTERM / Ctrl-C: the run saves a checkpoint (torchrun waits up to SHUTDOWN_TIMEOUT seconds,
# default 600) and the script exits 0; run the same command again to resume.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=examples/scripts/torchrun_lib.sh
. examples/scripts/torchrun_lib.sh
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
run_torchrun --standalone --nproc_per_node="$gpus" -m moue.cli --config "$config" "$@"
