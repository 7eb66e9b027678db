"""Launch environment: torchrun, SLURM and single-process worlds, read from fake environments."""

import pytest
import torch

from parallel.errors import UserError
from parallel.launch import read_launch_env, resolve_device

pytestmark = pytest.mark.compat


def test_torchrun_environment():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "node0", "MASTER_PORT": "6000"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "node0", 6000, "torchrun")


def test_slurm_environment_without_torchrun():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                           "MASTER_ADDR": "node7"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5, 8, 1, "node7", "slurm")


def test_slurm_multi_task_without_master_addr_says_how_to_set_it():
    with pytest.raises(UserError, match="set MASTER_ADDR"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_plain_process_is_a_world_of_one():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


def test_bad_integer_names_the_variable():
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
