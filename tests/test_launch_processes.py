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
