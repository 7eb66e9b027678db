"""Step metrics known on every rank: losses live on the last pipeline stage, per data shard.

Every function takes the process groups it uses (Megatron's ``ProcessGroupCollection``, whose
``dp`` and ``pp`` are the data-parallel and pipeline groups of this rank); none reads Megatron's
global parallel state.
"""

from __future__ import annotations

import torch


def is_last_stage(pg_collection) -> bool:
    return pg_collection.pp.rank() == pg_collection.pp.size() - 1


def step_mean(losses: list[dict], key: str, device, pg_collection) -> float:
    """Mean of ``key`` over the step's micro-batches, averaged over data-parallel ranks, broadcast
    from the last pipeline stage so every rank returns the same number."""
    value = torch.zeros(1, device=device)
    if is_last_stage(pg_collection):
        value[0] = torch.stack([x[key].float() for x in losses]).mean()
        torch.distributed.all_reduce(value, group=pg_collection.dp)
        value /= pg_collection.dp.size()
    pp = pg_collection.pp
    torch.distributed.broadcast(value, src=torch.distributed.get_global_rank(pp, pp.size() - 1),
                                group=pp)
    return value.item()


def data_parallel_slice(global_batch_size: int, dp_group) -> tuple[int, int]:
    """(first sample, number of samples) of this data-parallel rank within a global batch."""
    per_rank = global_batch_size // dp_group.size()
    return dp_group.rank() * per_rank, per_rank


def is_logging_rank(pg_collection) -> bool:
    """The one rank that writes logs and plots: global rank 0's peer on the last stage."""
    return (is_last_stage(pg_collection) and pg_collection.dp.rank() == 0
            and pg_collection.tp.rank() == 0)


def tracked_moe_values(num_microbatches: int, pg_collection) -> dict[str, list[float]]:
    """What MoE routers recorded in Megatron's aux-loss tracker during the step, per name and
    per layer (0 for dense layers): reduced over stages and sequence shards (Megatron's
    ``reduce_aux_losses_tracker_across_ranks``, once per step: it reduces every name),
    averaged over micro-batches and data-parallel ranks. The tracker is then cleared. Every
    rank must call it (collectives)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks(pg_collection=pg_collection)
    out, dp = {}, pg_collection.dp.size()
    for name, entry in tracker.items():
        values = entry["values"].float() / num_microbatches
        torch.distributed.all_reduce(values, group=pg_collection.dp)
        out[name] = (values / dp).tolist()
    clear_aux_losses_tracker()
    return out


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` is set on any rank of ``group`` (default: the whole world), e.g. a
    signal that reached only some processes."""
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend(group) == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(value.item())


def step_rows(rows: list[torch.Tensor], count: int, width: int, device, pg_collection) -> torch.Tensor:
    """This rank's ``count`` per-micro-batch rows of ``width`` values (the last pipeline stage's
    are real, the others' ignored), gathered over the data-parallel ranks in the global batch's
    order and broadcast from the last stage: ``[dp * count, width]`` on every rank."""
    dp = pg_collection.dp
    out = torch.zeros(dp.size() * count, width, device=device)
    if is_last_stage(pg_collection):
        local = torch.stack([r.float().to(device) for r in rows])
        parts = list(out.split(count))  # views of out: gathered in place, in rank order
        torch.distributed.all_gather(parts, local, group=dp)
    pp = pg_collection.pp
    torch.distributed.broadcast(out, src=torch.distributed.get_global_rank(pp, pp.size() - 1),
                                group=pp)
    return out
