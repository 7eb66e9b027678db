"""Launch environment: torchrun, SLURM and single-process worlds, read from fake environments."""

import os

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


def test_cuda_device_max_connections_is_set_for_tensor_parallel_runs(monkeypatch):
    from parallel.launch import set_cuda_device_max_connections

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert set_cuda_device_max_connections(1) is None
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    assert set_cuda_device_max_connections(2) is None
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    warning = set_cuda_device_max_connections(4)
    assert "CUDA_DEVICE_MAX_CONNECTIONS=8 with parallel.tp=4" in warning
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"  # the user's value is kept


def test_conversion_commands_hide_the_gpus_of_a_gpu_node(monkeypatch):
    import parallel.launch as launch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launch.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert launch.run_on_cpu_only() is True  # a GPU node: the command says it runs on the CPU
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert launch.run_on_cpu_only() is False  # already hidden: nothing to say
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(launch.glob, "glob", lambda pattern: [])
    assert launch.run_on_cpu_only() is False  # a CPU machine
