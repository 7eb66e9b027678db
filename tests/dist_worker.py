"""One rank of a ``tests.distributed.launch``: runs every case of a module for this world size.

Usage (done by the launcher): torchrun --nproc_per_node=N -m tests.dist_worker MODULES OUT_DIR
(or the same under mpiexec); MODULES is one case module or several, comma-separated, run in
that order. Each rank writes ``{module: {case: outcome}}`` to OUT_DIR/rank<N>.json. Start-up goes through ``parallel.launch``, as a real run's does.
"""

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from parallel import cpu_backend, launch


def _reset_between_cases(device: str):
    launch.destroy_model_parallel()  # and its groups: kept, they slow every later case down
    if device == "cpu":
        cpu_backend.enable()  # a case may have switched adaptations off; restore them all
    torch.distributed.barrier()


def main(modules: str, out_dir: str) -> None:
    env = launch.read_launch_env()
    device = os.environ.get("MOUE_TEST_DEVICE", "cpu")
    launch.init_distributed(device=device, timeout_minutes=3, env=env)
    only = os.environ.get("MOUE_TEST_CASES")
    out = Path(out_dir) / f"rank{env.rank}.json"
    results: dict[str, dict] = {}
    for module in modules.split(","):
        cases = importlib.import_module(module).CASES
        names = [n for n in cases.names(env.world_size) if not only or n in only.split(",")]
        results[module] = {}
        for name in names:
            fn, _ = cases.fns[name]
            start = time.perf_counter()
            try:
                outcome = {"ok": True, "value": fn()}
            except Exception as err:  # a case's failure is a result, not the end of the launch
                outcome = {"ok": False, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()}
            results[module][name] = {**outcome, "seconds": time.perf_counter() - start}
            out.write_text(json.dumps(results))
            _reset_between_cases(device)
    out.write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
