"""The universal expert pool and the universal expert-embedding table, shared by all MoE layers.

One pool (``E/EP`` of the pool's ``E`` experts on each expert-parallel rank) serves every MoE
layer of a pipeline stage. It is registered once, on the decoder, so ``parameters()``, DDP
buffers and checkpoints hold it once. Two implementations, chosen by ``moe.expert_impl``:

- ``ExpertPool``: Megatron-Core's ``SequentialMLP`` (one MLP per expert, a loop over them);
- ``GroupedExpertPool``: Megatron-Core's ``TEGroupedMLP`` (all local experts in one grouped
  GEMM): Transformer Engine's ``GroupedLinear`` on GPUs, ``TorchGroupedLinear`` elsewhere.

Placement: Megatron-Core gives EP rank ``r`` the contiguous expert indices
``[r*E/EP, (r+1)*E/EP)``. A window of consecutive pool ids would then sit on one or two ranks
and that layer's tokens would all go there. Pool expert ``e`` is therefore placed on rank
``e mod EP``: Megatron index ``m = r*E_loc + i`` holds pool id ``e = i*EP + r``. The router
emits its routing map in Megatron's order (``megatron_to_pool``). ``PoolPlacement`` (shared by
both pools) keys checkpoints by pool id, so they load under any EP and into either pool: both
write ``experts.linear_fc1.weight`` / ``experts.linear_fc2.weight`` with the expert axis first.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP


def megatron_to_pool(num_experts: int, ep: int) -> torch.Tensor:
    """Pool id held at each Megatron expert index [E]: ``m = r*E_loc + i -> i*ep + r``."""
    local = num_experts // ep
    m = torch.arange(num_experts)
    return (m % local) * ep + m // local


class PoolPlacement:
    """What both pools share: the pool ids of this rank, and checkpoints keyed by pool id.

    Megatron's experts write their shards at Megatron expert indices; ``sharded_state_dict``
    moves each to its pool id on the expert axis, and marks the pool as replicated over
    pipeline stages and expert-data-parallel ranks."""

    def _place(self, pg_collection) -> None:
        self.pp_group = pg_collection.pp  # pipeline stages hold replicas of the pool

    def pool_ids(self) -> list[int]:
        ep, rank = self.ep_group.size(), self.ep_group.rank()
        return [i * ep + rank for i in range(self.num_local_experts)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("moue's pool does not support singleton_local_shards")
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = len(sharded_offsets)
        to_pool = megatron_to_pool(self.ep_group.size() * self.num_local_experts,
                                   self.ep_group.size()).tolist()
        replica = (self.pp_group.rank(), self.dp_group.rank())

        def move(sh):
            if isinstance(sh, ShardedTensorFactory):  # e.g. SwiGLU's fc1: built at save/load
                build = sh.build_fn
                sh.build_fn = lambda *args: dict_list_map_inplace(move, build(*args))
            else:
                offset = list(sh.global_offset)
                offset[axis] = to_pool[offset[axis]]
                sh.global_offset = tuple(offset)
            sh.replica_id = (replica[0], sh.replica_id[1], replica[1])
            return sh

        return dict_list_map_inplace(move, state)


class ExpertPool(PoolPlacement, SequentialMLP):
    """Megatron's SequentialMLP holding this rank's share of the pool (pool ids ``i*EP + r``)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self._place(pg_collection)

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


class GroupedExpertPool(PoolPlacement, TEGroupedMLP):
    """Megatron's TEGroupedMLP holding this rank's share of the pool: one grouped GEMM per
    linear over the local experts, in Megatron's expert order (as the router emits it)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.dp_group = pg_collection.expt_dp
        self._place(pg_collection)


def accumulate_on_every_call(module: torch.nn.Module) -> None:
    """Make every Transformer Engine linear of ``module`` (a module called by several layers in
    one micro-batch) accumulate its weight gradient on every call.

    Megatron's TE wrappers tell TE ``is_first_microbatch=True`` on a module's first call of a run
    (and, under FP8, of every step); with gradient-accumulation fusion TE then *overwrites*
    ``main_grad`` in that call's backward, which for the pool is layer 1's and runs last: every
    other layer's gradient would be lost. With ``disable_parameter_transpose_cache`` the wrappers
    pass ``None``: TE accumulates on every call (``main_grad`` is zeroed at each step by
    Megatron DDP) and quantizes the weights on each call instead of caching them for the step
    (docs/gpu.md: the cost, and why this over the alternatives)."""
    for sub in module.modules():
        if hasattr(sub, "disable_parameter_transpose_cache"):
            sub.disable_parameter_transpose_cache = True


class UniversalEmbedding(torch.nn.Module):
    """U: one d_r-dimensional embedding per pool expert, shared by every router [E, d_r]. A plain
    parameter used through torch ops: autograd sums its per-layer gradients, whatever the
    fusion settings, and Megatron DDP adds the sum into ``main_grad``."""

    def __init__(self, num_experts: int, state_dim: int, init_method, sequence_parallel: bool,
                 device: torch.device | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_experts, state_dim, device=device))
        init_method(self.weight)
        # Replicated over tensor-parallel ranks; under sequence parallelism each rank's gradient
        # covers its sequence shard, so finalize_model_grads sums them over the TP group.
        self.weight.sequence_parallel = sequence_parallel


def shared_pool_factory(experts_spec, grouped: bool):
    """A stand-in for ``MoESubmodules.experts`` that builds the pool on first use, then reuses it.

    A class (Megatron's ``build_module`` returns plain functions uncalled), one per model build.
    """

    from moue.model.layer_specs import submodules_of

    pool_class = GroupedExpertPool if grouped else ExpertPool

    class SharedPool:
        pool: ExpertPool | GroupedExpertPool | None = None

        def __new__(cls, num_local_experts, config, pg_collection=None, **_):
            if cls.pool is None:
                cls.pool = pool_class(num_local_experts, config, submodules_of(experts_spec),
                                      pg_collection)
                accumulate_on_every_call(cls.pool)
            return cls.pool

    return SharedPool
