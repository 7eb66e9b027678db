"""One rank of a ``tests.distributed.launch``: runs every case of a module for this world size.

Usage (done by the launcher): torchrun --nproc_per_node=N -m tests.dist_worker MODULE OUT_DIR
(or the same under mpiexec). Start-up goes through ``parallel.launch``, as a real run's does.
"""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from parallel import cpu_backend, launch


def _reset_between_cases(device: str):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if device == "cpu":
        cpu_backend.enable()  # a case may have switched adaptations off; restore them all
    torch.distributed.barrier()


def main(module: str, out_dir: str) -> None:
    env = launch.read_launch_env()
    device = os.environ.get("MOUE_TEST_DEVICE", "cpu")
    launch.init_distributed(device=device, timeout_minutes=3, env=env)
    cases = importlib.import_module(module).CASES
    only = os.environ.get("MOUE_TEST_CASES")
    names = [n for n in cases.names(env.world_size) if not only or n in only.split(",")]
    out = Path(out_dir) / f"rank{env.rank}.json"
    results = {}
    for name in names:
        fn, _ = cases.fns[name]
        try:
            results[name] = {"ok": True, "value": fn()}
        except Exception as err:  # a case's failure is a result, not the end of the launch
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
        out.write_text(json.dumps(results))
        _reset_between_cases(device)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
