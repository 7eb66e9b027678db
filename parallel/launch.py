"""Process-group start-up: launch environment, torch.distributed, Megatron parallel state, seeds.

Launchers supported (no home-made communication: torch.distributed with env:// rendezvous):
- ``torchrun`` (single or multi node): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- ``mpirun`` / ``srun`` without torchrun: rank and size come from mpi4py (``pip install
  moue[mpi]``); rank 0's host name is broadcast as MASTER_ADDR and MASTER_PORT defaults to 29500.
  Under SLURM without mpi4py, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are read.
- A plain ``python`` process: a world of one on 127.0.0.1.

Backend: nccl when the run's device is cuda, gloo on CPU (where the CPU backend of
``parallel.cpu_backend`` is switched on).
"""

from __future__ import annotations

import datetime
import glob
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from parallel.errors import UserError
from parallel.layout import ParallelLayout


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | mpi | slurm | single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer; "
                         "check the launcher's command line") from err


def _from_variables(env, rank: str, size: str, local_rank: str, launcher: str) -> LaunchEnv:
    return LaunchEnv(
        rank=_int_env(env, rank), world_size=_int_env(env, size),
        local_rank=_int_env(env, local_rank) if local_rank in env else 0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        launcher=launcher,
    )


def read_launch_env(env: dict | None = None) -> LaunchEnv:
    """Read the rank environment of torchrun, mpirun (via mpi4py) or srun."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_variables(env, "RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun")
    mpi = _mpi_launch_env(env)
    if mpi is not None:
        return mpi
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        if _int_env(env, "SLURM_NTASKS") > 1 and "MASTER_ADDR" not in env:
            raise UserError(
                f"srun without torchrun: set MASTER_ADDR to the first host of {nodes!r} "
                "(e.g. MASTER_ADDR=$(scontrol show hostnames | head -n1)), or install moue[mpi]."
            )
        return _from_variables(env, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "slurm")
    return LaunchEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                     master_port=_free_port(), launcher="single")


def global_rank_from_env(env=None) -> int:
    """This process's rank as its launcher announces it (torchrun, Open MPI / PMI, SLURM), read
    without starting anything; 0 for a lone process."""
    env = os.environ if env is None else env
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _mpi_launch_env(env) -> LaunchEnv | None:
    if not any(m in env for m in _MPI_MARKERS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    return LaunchEnv(
        rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=local.Get_rank(),
        master_addr=env.get("MASTER_ADDR", addr),
        master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        launcher="mpi",
    )


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        raise UserError(f"device={requested!r}: use 'auto', 'cpu' or 'cuda'.")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return torch.device(requested)


def run_on_cpu_only() -> bool:
    """Hide this node's GPUs from this process (``CUDA_VISIBLE_DEVICES=``) before any CUDA call,
    for the commands that run on the CPU wherever they are started (conversion and export hold
    the whole model in host memory; the CPU backend refuses a process that sees a GPU). Returns
    whether GPUs were there to hide (``/dev/nvidia<N>``), so the command can say so."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return visible != "" and bool(glob.glob("/dev/nvidia[0-9]*"))


def set_cuda_device_max_connections(tp: int) -> str | None:
    """``CUDA_DEVICE_MAX_CONNECTIONS=1`` for tensor-parallel runs, as Megatron-LM's launch scripts
    export it: Megatron-Core's linears issue a TP all-reduce or reduce-scatter and then the
    weight-gradient GEMM, relying on one hardware queue to start the communication first
    (tensor_parallel/layers.py: "Here we rely on CUDA_DEVICE_MAX_CONNECTIONS=1"). CUDA reads it
    when the context is created, so this runs before any CUDA call. A value the user set is kept;
    returns a warning when it is not 1 under TP."""
    current = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if tp <= 1:
        return None
    if current is None:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        return None
    if current != "1":
        return (f"CUDA_DEVICE_MAX_CONNECTIONS={current} with parallel.tp={tp}: Megatron-Core's "
                "tensor-parallel overlap expects 1 (communication is then issued before the "
                "weight-gradient GEMM); unset it to let moue-pretrain set 1")
    return None


def init_distributed(
    layout: ParallelLayout | None = None,
    *,
    device: str = "auto",
    timeout_minutes: float = 10,
    env: LaunchEnv | None = None,
) -> ParallelLayout:
    """Start torch.distributed and Megatron's parallel state for this process; returns the layout.

    ``layout`` (default: pure data parallelism) must have been validated for the world size the
    launcher reports (``moue.run_check`` does so before calling this), so a bad combination
    fails with a clear message on every rank before any process group exists.
    """
    env = env or read_launch_env()
    layout = layout or ParallelLayout(world_size=env.world_size)
    if layout.world_size != env.world_size:
        raise UserError(f"the layout is for {layout.world_size} processes but the launcher "
                        f"({env.launcher}) started {env.world_size}; launch "
                        f"{layout.world_size} processes or change parallel.*")
    dev = resolve_device(device)
    if dev.type == "cpu":
        from parallel import cpu_backend

        cpu_backend.enable()
    else:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        if env.launcher == "single":
            # A lone process owns its rendezvous. A MASTER_PORT inherited from a parent (a test
            # runner, a benchmark driver) would make two lone processes share one store and hang.
            init_method = f"tcp://{env.master_addr}:{env.master_port}"
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            init_method = "env://"
        torch.distributed.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method=init_method, rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    init_model_parallel(layout)
    return layout


def init_model_parallel(layout: ParallelLayout) -> None:
    """(Re)build Megatron-Core's process groups for ``layout`` on the running world."""
    from megatron.core import parallel_state

    if torch.distributed.get_world_size() != layout.world_size:
        raise ValueError(f"layout is for world_size={layout.world_size} but "
                         f"{torch.distributed.get_world_size()} processes are running")
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's tracked RNG states (tensor/expert parallel).

    As in Megatron-LM, each pipeline stage offsets the seed by 100 so stages do not share
    dropout streams; tensor- and expert-parallel offsets are applied by Megatron's
    ``model_parallel_cuda_manual_seed``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Megatron's parallel state and its process groups. ``parallel_state.destroy_model_parallel``
    forgets the groups without destroying them: a process that builds its layout again would
    keep every earlier group's threads and connections (measured: a launch of 42 test cases ran
    in 167 s with them kept, 116 s with them destroyed; docs/testing.md)."""
    from megatron.core import parallel_state

    from parallel.compat import forget_moe_metrics

    parallel_state.destroy_model_parallel()
    # Megatron 0.16 leaves some groups set (_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP and its
    # gloo twin), and its MoE figure tracker holds each entry's reduce groups: either keeps a
    # destroyed group's threads alive.
    for name, value in list(vars(parallel_state).items()):
        if name.startswith("_") and isinstance(value, torch.distributed.ProcessGroup):
            setattr(parallel_state, name, None)
    forget_moe_metrics()
    if torch.distributed.is_initialized():
        world = torch.distributed.GroupMember.WORLD
        for group in list(torch.distributed.distributed_c10d._world.pg_map):
            if group is not world:
                torch.distributed.destroy_process_group(group)


def shutdown() -> None:
    """Tear down Megatron's parallel state, its groups and the default process group, and switch
    the CPU adaptations off: they live only while a CPU world is up (with them on, a later
    ``transformers`` ``from_pretrained`` in the same process left Mixtral's RoPE buffer
    uninitialised; docs/cpu_backend.md)."""
    from parallel import cpu_backend

    destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if cpu_backend.active() is not None:
        cpu_backend.active().disable()
