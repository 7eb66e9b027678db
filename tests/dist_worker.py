"""The ranks of ``tests.distributed``'s launches: run case modules' cases for this world size.

Usage (done by the launcher): ``torchrun --nproc_per_node=N -m tests.dist_worker MODULES OUT_DIR``
(or the same under mpiexec) runs MODULES (one case module or several, comma-separated, in that
order) and exits; ``... -m tests.dist_worker --serve DIR`` stays up and runs the requests
``DIR/request<n>.json`` in order (``tests.distributed.Workers``). Each rank writes
``{module: {case: outcome}}`` per launch or request. Start-up goes through ``parallel.launch``, as
a real run's does.
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


def run_cases(modules: list[str], only: list[str], device: str, out: Path) -> None:
    """Every case of ``modules`` for this world size (``only``: just these), results to ``out``
    after each case, so a crash leaves the earlier ones readable."""
    results: dict[str, dict] = {}
    for module in modules:
        cases = importlib.import_module(module).CASES
        names = [n for n in cases.names(torch.distributed.get_world_size())
                 if not only or n in only]
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


def main(modules: str, out_dir: str) -> None:
    env = launch.read_launch_env()
    device = os.environ.get("MOUE_TEST_DEVICE", "cpu")
    launch.init_distributed(device=device, timeout_minutes=3, env=env)
    only = [n for n in os.environ.get("MOUE_TEST_CASES", "").split(",") if n]
    run_cases(modules.split(","), only, device, Path(out_dir) / f"rank{env.rank}.json")
    torch.distributed.destroy_process_group()


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(requests: str) -> None:
    """Run ``request<n>.json`` for n = 0, 1, ... until one says stop or pytest is gone. Each
    request starts from the default layout with the CPU adaptations on, as a fresh launch does,
    and its environment variables set for its cases only; what a case module leaves in its own
    globals carries over (each module runs once per session: ``launch`` caches results)."""
    env = launch.read_launch_env()
    device = "cpu"
    launch.init_distributed(device=device, timeout_minutes=3, env=env)
    parent = int(os.environ["MOUE_TEST_PARENT"])
    directory = Path(requests)
    for n in range(sys.maxsize):
        request = directory / f"request{n}.json"
        while not request.exists():
            if not _parent_alive(parent):
                return
            time.sleep(0.02)
        asked = json.loads(request.read_text())
        if asked.get("stop"):
            break
        launch.init_distributed(device=device, env=env)  # the start-up layout again
        saved = {k: os.environ.get(k) for k in asked["env"]}
        os.environ.update(asked["env"])
        partial = directory / f".result{n}_rank{env.rank}.json"
        try:
            run_cases(asked["modules"], asked["only"], device, partial)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        partial.rename(directory / f"result{n}_rank{env.rank}.json")  # complete
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        main(*sys.argv[1:3])
