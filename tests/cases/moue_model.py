"""Cases: the MoUE model under every parallel layout (see test_moue_model.py)."""

from functools import partial

import torch
from megatron.core import parallel_state

from tests.distributed import Cases
from tests.megatron_gpt import LAYOUTS, layout_for, train
from tests.moue_gpt import moue_builder, tiny

CASES = Cases()


def _pool_replicas_identical(model) -> bool | None:
    """Whether every pipeline stage holds bit-identical pool and U values (None with pp=1)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if group.size() == 1:
        return None
    decoder = model.module.decoder
    flat = torch.cat([p.detach().flatten() for p in (*decoder.expert_pool.parameters(),
                                                     *decoder.expert_embedding.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(group.size())]
    torch.distributed.all_gather(gathered, flat, group=group)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _train(layout: str, world_size: int, *overrides: str) -> dict:
    run = train(moue_builder(tiny(*overrides)), layout_for(layout, world_size))
    return {"losses": run["losses"], "grad_norms": run["grad_norms"],
            "balance_loss": run["balance_loss"],
            "replicas_identical": _pool_replicas_identical(run["model"])}


CASES.add("moue_train[single]", partial(_train, "single", 1), nproc=1)
for _name in LAYOUTS:
    CASES.add(f"moue_train[{_name}]", partial(_train, _name, 2), nproc=2)
