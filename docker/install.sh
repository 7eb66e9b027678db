#!/usr/bin/env bash
# The one install path of moue: `make install` (so CI), the CPU image and the GPU image all run
# this script, so every CI run exercises the images' install steps. Run from anywhere:
#
#   docker/install.sh [--venv DIR] [--system-site-packages] [--base-torch] [--extras LIST]
#                     [--require LIST]
#
#   --venv DIR               the virtual environment (default .venv); made if absent
#   --system-site-packages   the venv sees the base's packages (GPU image: NGC's torch,
#                            Transformer Engine, apex, NCCL)
#   --base-torch             torch must already import (from the base): fail instead of
#                            installing one
#   --extras LIST            the project's extras, comma-separated (default dev,mpi)
#   --require LIST           packages that must import at the end (transformer_engine,apex)
#
# Environment: PYTHON makes the venv (python3); TORCH is installed where torch does not import
# (torch==2.13.0), from TORCH_INDEX_URL when set (the CPU image: PyTorch's CPU wheel index, so
# a CPU build and never a multi-GB CUDA one); MCORE is installed with the project (unset: the
# newest megatron-core in the project's range for this Python).
#
# Steps: 1. the venv; 2. torch, unless it imports; 3. the installed base packages (torch,
# Transformer Engine, apex, NVIDIA's libraries, Triton) pinned as pip constraints, so the project
# install cannot replace them; 4. the project (editable) with its extras; 5. fail if a base
# package changed anyway; 6. moue-env: fail if anything is outside the versions moue supports.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv extras=dev,mpi require="" base_torch=0
venv_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
    # With the base's packages visible, the base's pip serves the venv as well (and a Debian or
    # Ubuntu Python without python3-venv can make such a venv, but not one with its own pip).
    --system-site-packages) venv_args+=(--system-site-packages --without-pip); shift ;;
    --base-torch) base_torch=1; shift ;;
    --extras) extras=${2?--extras needs a list (may be empty)}; shift 2 ;;
    --require) require=${2:?--require needs a list}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1'; see docker/install.sh --help" >&2; exit 2 ;;
  esac
done

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "${venv_args[@]}" "$venv"
fi
py=$venv/bin/python

if ! "$py" -c "import torch" 2>/dev/null; then
  if [ "$base_torch" = 1 ]; then
    echo "install.sh: torch does not import in $venv, and --base-torch says it must come from" \
      "the base (the GPU image: NGC PyTorch). Build on the NGC PyTorch base, or drop" \
      "--base-torch to install ${TORCH:-torch==2.13.0}." >&2
    exit 1
  fi
  "$py" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    "${TORCH:-torch==2.13.0}"
fi

pins=$venv/base-packages.txt
"$py" -m parallel.environment pin "$pins"
constraints=(-c "$pins")
# The base's own constraints stay too (NGC: /etc/pip/constraint.txt).
for file in ${PIP_CONSTRAINT:-}; do
  constraints+=(-c "$file")
done
target=.
[ -n "$extras" ] && target=".[$extras]"
"$py" -m pip install "${constraints[@]}" -e "$target" ${MCORE:+"$MCORE"}
"$py" -m parallel.environment verify "$pins"
"$venv/bin/moue-env" ${require:+--require "$require"}
touch "$venv/.installed"
