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


@CASES.case(nproc=2)
def layout_rebuilt():
    """Megatron's groups after building the layout once, and again after rebuilding it twice
    (earlier groups destroyed, not kept alive beside the new ones)."""
    from parallel.layout import ParallelLayout

    groups = torch.distributed.distributed_c10d._world.pg_map
    counts = []
    for tp in (2, 1, 2):
        launch.init_model_parallel(ParallelLayout(world_size=2, tp=tp))
        counts.append(len(groups))
    launch.destroy_model_parallel()
    return {"groups": counts, "after_destroy": len(groups)}
