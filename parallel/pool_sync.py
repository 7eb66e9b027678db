"""Keeping the universal pool consistent across ranks: replicas over pipeline stages, loads.

- Every pipeline stage holds a replica of its EP shard of the pool (and of U). Replicas start
  equal (each stage draws them from the same global checkpoint keys, ``moue.model.init``, or
  loads them from one checkpoint) and stay equal because their gradients are summed
  over the pipeline group before the optimizer step by Megatron's
  ``_allreduce_conditional_embedding_grads`` (finalize_model_grads.py), which acts on parameters
  tagged ``pipeline_parallel=True`` when ``config.has_cond_embedder`` is set.
  ``shared=True`` on stages > 0 keeps the grad norm from counting a replica twice
  (``param_is_not_shared``); ``shared_embedding=True`` gives each its own bucket so the
  distributed optimizer shards it alike on every stage.
- The pool's loads (assignments per expert) are summed over every rank once per step:
  ranks of a step route distinct tokens (data / sequence shards) or distinct layers (stages).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def mark_pipeline_replicas(params: Iterable[torch.nn.Parameter], pp_group) -> None:
    """Tag pool/U parameters as replicas over ``pp_group`` (no-op with one stage)."""
    if pp_group.size() == 1:
        return
    for param in params:
        param.pipeline_parallel = True
        param.shared_embedding = True
        param.shared = pp_group.rank() > 0


@torch.no_grad()
def finish_step_loads(balances: Iterable, group=None) -> torch.Tensor | None:
    """Sum each balance module's per-layer step counts over ``group`` (default: all ranks) and
    hand them back (the next step's loads and selection biases). Returns the summed [L, E] counts
    (every layer's, from every stage) of the last module, for logging."""
    summed = None
    for balance in balances:
        summed = balance.counts_LE.clone()
        torch.distributed.all_reduce(summed, group=group)
        balance.end_step(summed)
    return summed
