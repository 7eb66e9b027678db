"""Cases: process-group start-up through parallel.launch, under torchrun and under mpirun."""

import torch
from megatron.core import parallel_state

from parallel import launch
from tests.distributed import Cases

CASES = Cases()


@CASES.case(nproc=2)
def world():
    env = launch.read_launch_env()
    total = torch.tensor([float(env.rank + 1)])
    torch.distributed.all_reduce(total)  # over gloo: 1 + 2
    return {"launcher": env.launcher, "rank": env.rank, "local_rank": env.local_rank,
            "world_size": env.world_size, "all_reduce": total.item(),
            "backend": torch.distributed.get_backend(),
            "megatron_dp": parallel_state.get_data_parallel_world_size()}
