"""Step metrics known on every rank: losses live on the last pipeline stage, per data shard."""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def step_mean(losses: list[dict], key: str, device) -> float:
    """Mean of ``key`` over the step's micro-batches, averaged over data-parallel ranks, broadcast
    from the last pipeline stage so every rank returns the same number."""
    value = torch.zeros(1, device=device)
    if parallel_state.is_pipeline_last_stage():
        value[0] = torch.stack([x[key].float() for x in losses]).mean()
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    torch.distributed.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return value.item()


def data_parallel_slice(global_batch_size: int) -> tuple[int, int]:
    """(first sample, number of samples) of this data-parallel rank within a global batch."""
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    per_rank = global_batch_size // dp
    return rank * per_rank, per_rank


def is_logging_rank() -> bool:
    """The one rank that writes logs and plots: global rank 0's peer on the last stage."""
    return (parallel_state.is_pipeline_last_stage()
            and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def tracked_moe_values(num_microbatches: int) -> dict[str, list[float]]:
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
    reduce_aux_losses_tracker_across_ranks()
    out, dp = {}, parallel_state.get_data_parallel_world_size()
    for name, entry in tracker.items():
        values = entry["values"].float() / num_microbatches
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        out[name] = (values / dp).tolist()
    clear_aux_losses_tracker()
    return out


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (e.g. a signal that reached only some processes)."""
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
