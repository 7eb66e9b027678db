#!/usr/bin/env bash
# The CPU quickstart: a small rotational MoUE on 2 CPU processes (EP=2), on mock data unless
# a dataset is given: DATA=data/stdlib examples/scripts/train_cpu_2proc.sh [key=value ...]
# Uses the project's .venv (made by `make install`) when there is one, else PYTHON or python3.
# Ctrl-C / SIGTERM: the run saves a checkpoint (with checkpoint.dir=...) and the script exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=examples/scripts/torchrun_lib.sh
. examples/scripts/torchrun_lib.sh
data=()
[ -n "${DATA:-}" ] && data=(data.mock=false "data.path=$DATA" data.tokenizer=byte)
export CUDA_VISIBLE_DEVICES='' TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1
run_torchrun --standalone --nproc_per_node=2 -m moue.cli \
  --config examples/configs/tiny_cpu.yaml "${data[@]}" "$@"
