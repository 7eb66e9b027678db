"""Start-up of real 2-process worlds through parallel.launch: torchrun, and mpirun via mpi4py."""

import importlib.util

import pytest

from tests.distributed import launch

CASES = "tests.cases.launch_env"


def _check_world(values, launcher):
    assert [v["rank"] for v in values] == [0, 1]
    for v in values:
        assert (v["launcher"], v["world_size"], v["backend"]) == (launcher, 2, "gloo")
        assert v["all_reduce"] == 3.0 and v["megatron_dp"] == 2
    assert sorted(v["local_rank"] for v in values) == [0, 1]


@pytest.mark.compat
def test_torchrun_world():
    _check_world(launch(CASES, 2)["world"], "torchrun")


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                    reason="mpi4py not installed (pip install -e .[mpi])")
def test_mpirun_world():
    _check_world(launch(CASES, 2, launcher="mpirun")["world"], "mpi")


def test_lone_processes_ignore_an_inherited_master_port():
    """Two plain processes started at once with the same stale MASTER_PORT (as a benchmark
    driver running inside pytest passes it on) each get their own world instead of hanging."""
    import os
    import subprocess
    import sys

    code = ("from parallel import launch; import torch; launch.init_distributed(device='cpu'); "
            "t = torch.ones(1); torch.distributed.all_reduce(t); print(int(t.item())); "
            "launch.shutdown()")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
           "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split()[-1] for out, _ in outs] == ["1", "1"]  # each a world of one


def test_rebuilding_the_layout_destroys_the_earlier_groups():
    for value in launch(CASES, 2)["layout_rebuilt"]:
        first, _, again = value["groups"]
        assert first > 1 and again == first, value  # not 3 layouts' groups alive at once
        assert value["after_destroy"] == 1, value  # the default group only
