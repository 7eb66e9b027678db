"""One rank of a ``tests.distributed.launch``: runs every case of a module for this world size.

Usage (done by the launcher): torchrun --nproc_per_node=N -m tests.dist_worker MODULE OUT_DIR
"""

import importlib
import json
import sys
import traceback
from pathlib import Path

import torch

from parallel import cpu_backend, launch


def _reset_between_cases():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    cpu_backend.enable()  # a case may have switched adaptations off; restore the full backend
    torch.distributed.barrier()


def main(module: str, out_dir: str) -> None:
    env = launch.read_launch_env()
    cpu_backend.enable()
    torch.distributed.init_process_group("gloo", rank=env.rank, world_size=env.world_size,
                                         timeout=__import__("datetime").timedelta(seconds=180))
    cases = importlib.import_module(module).CASES
    out = Path(out_dir) / f"rank{env.rank}.json"
    results = {}
    for name in cases.names(env.world_size):
        fn, _ = cases.fns[name]
        try:
            results[name] = {"ok": True, "value": fn()}
        except Exception as err:  # a case's failure is a result, not the end of the launch
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
        out.write_text(json.dumps(results))
        _reset_between_cases()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
