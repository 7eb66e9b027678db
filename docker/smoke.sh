#!/usr/bin/env bash
# What a user runs first in a new image, run by the CPU image's `smoke` build stage (so an image
# whose commands fail does not build) and usable in any installed checkout:
#
#   docker/smoke.sh [OUTPUT_DIR]      (default runs/smoke)
#
# 1. moue-env (versions, capabilities, the default plan); 2. a dry run of the tiny CPU config;
# 3. 20 training steps of it on 2 CPU processes under torchrun (mock data, a checkpoint at the
# end); 4. moue-eval of that checkpoint on one process. Prints the seconds of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/smoke}
bin=${VENV:-.venv}/bin
# One thread per process: 2 processes on a 2-core machine, and no cuda device is looked for.
export CUDA_VISIBLE_DEVICES="" TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1
config=examples/configs/tiny_cpu.yaml

step() {
  local name=$1 start=$SECONDS
  shift
  echo "== smoke: $name"
  "$@"
  echo "== smoke: $name passed in $((SECONDS - start)) s"
}

# Only what an earlier smoke run left: the directory may be anything the caller named.
rm -rf "$out/checkpoints" "$out/passed"
step "moue-env" "$bin/moue-env"
step "dry run" "$bin/moue-pretrain" --config "$config" --dry-run
# --local-addr: a build step's container may have a host name that does not resolve, which
# torchrun's rendezvous would otherwise wait 5 minutes to connect to.
step "20 steps on 2 processes" "$bin/python" -m torch.distributed.run --standalone \
  --local-addr=127.0.0.1 --nproc_per_node=2 -m moue.cli --config "$config" train.steps=20 train.warmup_steps=5 \
  checkpoint.dir="$out/checkpoints" checkpoint.interval=20 logging.dir="$out"
step "moue-eval of the checkpoint" "$bin/moue-eval" --load "$out/checkpoints"
echo "smoke passed" > "$out/passed"
