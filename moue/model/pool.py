"""The universal expert pool and the universal expert-embedding table, shared by all MoE layers.

One ``ExpertPool`` (Megatron-Core's ``SequentialMLP`` over the pool's ``E`` experts, ``E/EP`` on
each expert-parallel rank) serves every MoE layer of a pipeline stage. It is registered once, on
the decoder, so ``parameters()``, DDP buffers and checkpoints hold it once.

Placement: Megatron-Core gives EP rank ``r`` the contiguous expert indices
``[r*E/EP, (r+1)*E/EP)``. A window of consecutive pool ids would then sit on one or two ranks
and that layer's tokens would all go there. Pool expert ``e`` is therefore placed on rank
``e mod EP``: Megatron index ``m = r*E_loc + i`` holds pool id ``e = i*EP + r``. The router
emits its routing map in Megatron's order (``megatron_to_pool``); checkpoints are keyed by pool
id, so they load under any EP.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.moe.experts import SequentialMLP


def megatron_to_pool(num_experts: int, ep: int) -> torch.Tensor:
    """Pool id held at each Megatron expert index [E]: ``m = r*E_loc + i -> i*ep + r``."""
    local = num_experts // ep
    m = torch.arange(num_experts)
    return (m % local) * ep + m // local


class ExpertPool(SequentialMLP):
    """Megatron's SequentialMLP holding this rank's share of the pool (pool ids ``i*EP + r``)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.pp_group = pg_collection.pp  # pipeline stages hold replicas of the pool

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """SequentialMLP's loop over the local experts, leaving out those without tokens.

        A layer reaches only its window of the pool, so most of a rank's experts get no tokens
        from it (the standard MoE: all but N of L*N); Megatron's loop would still run each one
        on an empty batch. Tokens are the same on every expert-tensor-parallel rank, so all of
        them leave out the same experts. With no token at all, or FP8/FP4 padding, Megatron's
        own loop runs (it keeps this rank's part of the autograd graph for the dispatcher).
        """
        counts = tokens_per_expert.tolist()
        busy = [i for i, n in enumerate(counts) if n]
        if (not busy or self.num_local_experts == 1 or self.config.fp8 or self.config.fp4
                or self.config.moe_apply_probs_on_input):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        tokens = torch.split(permuted_local_hidden_states, counts)
        probs = torch.split(permuted_probs, counts)
        outputs = [self.local_experts[i](tokens[i], probs[i])[0] for i in busy]
        return torch.cat(outputs, dim=0), None

    def pool_ids(self) -> list[int]:
        ep, rank = self.ep_group.size(), self.ep_group.rank()
        return [i * ep + rank for i in range(self.num_local_experts)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each local expert under its pool id; pipeline stages hold replicas (replica_id[0])."""
        num_experts = self.ep_group.size() * self.num_local_experts
        pp_rank = self.pp_group.rank()
        out = {}
        for local_idx, (expert, pool_id) in enumerate(zip(self.local_experts, self.pool_ids(),
                                                          strict=True)):
            local_prefix = f"{prefix}local_experts.{local_idx}."
            state = expert.sharded_state_dict(
                local_prefix, (*sharded_offsets, (len(sharded_offsets), pool_id, num_experts)),
                metadata)
            replace_prefix_for_sharding(state, local_prefix, f"{prefix}experts.")
            for sh in state.values():
                # Replicated over expert-data-parallel ranks and over pipeline stages.
                sh.replica_id = (pp_rank, sh.replica_id[1], self.dp_group.rank())
            out.update(state)
        return out


class UniversalEmbedding(torch.nn.Module):
    """U: one d_r-dimensional embedding per pool expert, shared by every router [E, d_r]."""

    def __init__(self, num_experts: int, state_dim: int, init_method, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, state_dim))
        init_method(self.weight)
        # Replicated over tensor-parallel ranks; under sequence parallelism each rank's gradient
        # covers its sequence shard, so finalize_model_grads sums them over the TP group.
        self.weight.sequence_parallel = sequence_parallel


def shared_pool_factory(experts_spec):
    """A stand-in for ``MoESubmodules.experts`` that builds the pool on first use, then reuses it.

    A class (Megatron's ``build_module`` returns plain functions uncalled), one per model build.
    """

    from moue.model.layer_specs import submodules_of

    class SharedPool:
        pool: ExpertPool | None = None

        def __new__(cls, num_local_experts, config, pg_collection=None, **_):
            if cls.pool is None:
                cls.pool = ExpertPool(num_local_experts, config, submodules_of(experts_spec),
                                      pg_collection)
            return cls.pool

    return SharedPool
