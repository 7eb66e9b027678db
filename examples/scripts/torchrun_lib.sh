#!/usr/bin/env bash
# Sourced by the torchrun launch scripts (not run on its own).
#
# moue_python: the Python to run: $PYTHON, else the project's .venv (made by `make install`),
# else python3.
#
# run_torchrun ARGS...: `python -m torch.distributed.run ARGS...` with a clean stop on SIGTERM or
# SIGINT (Ctrl-C). torchrun runs in its own session, and this shell forwards the signal to it
# once; torchrun forwards it to the workers and waits up to SHUTDOWN_TIMEOUT seconds (default
# 600) while they finish their step and save a checkpoint. torchrun itself then exits 1
# (it re-raises the signal), so moue-pretrain leaves a note in $MOUE_STOP_FILE when it stopped
# cleanly, and this function returns 0 with that note instead of a failure.

moue_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x .venv/bin/python ]; then
    echo .venv/bin/python
  else
    echo python3
  fi
}

run_torchrun() {
  local stop_file pid status=0
  stop_file=$(mktemp)
  MOUE_STOP_FILE=$stop_file setsid "$(moue_python)" -m torch.distributed.run \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}" "$@" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
    status=0
    wait "$pid" || status=$?
  done
  trap - TERM INT
  if [ "$status" -ne 0 ] && [ -s "$stop_file" ]; then
    cat "$stop_file" >&2
    status=0
  fi
  rm -f "$stop_file"
  return "$status"
}
