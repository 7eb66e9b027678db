#!/usr/bin/env bash
# One GPU node: GPUS processes (default: all visible GPUs), e.g.
#   examples/scripts/train_1node_gpu.sh examples/configs/moue_1b_gpu.yaml parallel.ep=8
# SIGTERM (e.g. `kill -TERM <torchrun pid>`) saves a checkpoint and stops; torchrun waits up to
# SHUTDOWN_TIMEOUT seconds for it. torchrun itself then exits 1 (it re-raises the signal): the
# checkpoint is complete; run the same command again to resume.
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
python=${PYTHON:-python}
"$python" -m torch.distributed.run --standalone --nproc_per_node="$gpus" \
  --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}" -m moue.cli --config "$config" "$@"
