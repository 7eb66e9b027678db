#!/usr/bin/env bash
# Multi-node torchrun: run once per node with the same MASTER_ADDR / MASTER_PORT / NNODES and the
# node's NODE_RANK, e.g. on node 0 of 4:
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=0 examples/scripts/train_multinode.sh \
#       examples/configs/moue_1b_gpu.yaml
# Under SLURM use train_slurm.sbatch instead (no torchrun; SIGTERM reaches every task).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=examples/scripts/torchrun_lib.sh
. examples/scripts/torchrun_lib.sh
config=${1:?usage: $0 CONFIG.yaml [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
run_torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="${GPUS_PER_NODE:-8}" --master_addr="$MASTER_ADDR" \
  --master_port="${MASTER_PORT:-29500}" -m moue.cli --config "$config" "$@"
