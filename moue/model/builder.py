"""Build a MoUE GPT on Megatron-Core: GPTModel with the universal pool, router and balance.

Per pipeline stage the decoder holds, registered once each:
- ``decoder.expert_pool``: the stage's ``ExpertPool`` (its EP shard of the pool), referenced by
  every MoE layer as a plain attribute (so ``parameters()`` and checkpoints list it once);
- ``decoder.pool_balance``: the balance state (loads F, the selection biases);
- ``decoder.expert_embedding``: U, when the trajectory state is on.

Process groups are passed in (``pg_collection``), never fetched here.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.config import ModelConfig, MoEConfig
from moue.model.balance import Balance, build_balance
from moue.model.layer_specs import gpt_block_spec, moue_block_spec
from moue.model.pool import UniversalEmbedding, shared_pool_factory
from moue.model.router import SharedRouting, UniversalRouter
from moue.model.te_standins import parameter_device
from moue.model.topology import Topology
from parallel.capability import Plan
from parallel.pool_sync import mark_pipeline_replicas


def build_model(model_cfg: ModelConfig, moe: MoEConfig, topology: Topology | None,
                config: TransformerConfig, pg_collection, plan: Plan) -> GPTModel:
    """The MoUE GPT for this rank's pipeline stage (Megatron's dense GPT when
    ``model.moe_layer_freq=0``, ``topology`` None: the baseline with the same layers and no
    experts). ``topology`` is the run's one (``RunConfig.topology()``); ``plan`` chooses the
    layer spec and the pool (``parallel.capability.plan``)."""
    te = plan.transformer_impl == "transformer_engine"
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    gpt = _gpt(model_cfg, config, pg_collection)
    if model_cfg.dense:
        return gpt(transformer_layer_spec=gpt_block_spec(config, None, te))
    embedding = (UniversalEmbedding(moe.num_experts, moe.router_state_dim, config.init_method,
                                    config.sequence_parallel, parameter_device(config))
                 if moe.router_state_dim else None)
    shared = SharedRouting(topology=topology,
                           balance=build_balance(moe.balance, topology, moe.balance_coeff,
                                                 moe.aux_free_rate, moe.ep_balance_coeff,
                                                 moe.ep_balance_groups or pg_collection.ep.size(),
                                                 moe.ep_balance_rate),
                           embedding=embedding, moe_layer_freq=model_cfg.moe_layer_freq,
                           widen_block=moe.widen_block)
    experts_factory = None

    def remember_factory(experts_spec):
        nonlocal experts_factory
        experts_factory = experts_factory or shared_pool_factory(
            experts_spec, grouped=plan.expert_impl == "grouped")
        return experts_factory

    spec = moue_block_spec(config, moe_layer_freq=model_cfg.moe_layer_freq,
                           state_dim=moe.router_state_dim,
                           router=partial(UniversalRouter, shared=shared),
                           experts_factory=remember_factory, pp_rank=pp_rank, te=te)
    model = gpt(transformer_layer_spec=spec)
    _register_shared(model.decoder, experts_factory.pool, shared)
    # No collective here: the model is not on its device yet (U and the stand-ins' weights may be
    # created on the CPU for a GPU run). Replicas start equal because their initial values are
    # drawn from their global checkpoint keys (moue.model.init), or loaded from a checkpoint.
    mark_pipeline_replicas([*model.decoder.expert_pool.parameters(),
                            *(embedding.parameters() if embedding is not None else [])],
                           pg_collection.pp)
    if moe.router_state_dim:
        model.decoder.layers[0].unpack_state = pp_rank > 0
        model.decoder.layers[-1].pack_state = pp_rank < pp_size - 1
    return model


def build_megatron_moe(model_cfg: ModelConfig, moe: MoEConfig, config: TransformerConfig,
                       pg_collection, plan: Plan) -> GPTModel:
    """Megatron-Core's own GPT with MoE for the same config, no MoUE module: every layer an MoE
    layer of ``moe.num_experts / num_layers`` private experts behind Megatron's router and its
    Switch aux loss. The standard-MoE baseline that benchmarks and tests step on moue's engine.
    Megatron sums its per-layer aux losses where moue's ``per_layer`` balance averages them, so
    its coefficient is ``moe.balance_coeff / num_layers``: the same config weighs the same loss."""
    layers = model_cfg.num_layers
    if model_cfg.moe_layer_freq != 1 or moe.num_experts % layers:
        raise ValueError(f"Megatron's MoE baseline puts moe.num_experts={moe.num_experts} "
                         f"evenly on all {layers} layers; it needs model.moe_layer_freq=1 "
                         f"(got {model_cfg.moe_layer_freq}) and a multiple of {layers} experts")
    per_layer = moe.num_experts // layers
    config = dataclasses.replace(config, num_moe_experts=per_layer,
                                 moe_router_load_balancing_type="aux_loss",
                                 moe_aux_loss_coeff=moe.balance_coeff / layers)
    te = plan.transformer_impl == "transformer_engine"
    return _gpt(model_cfg, config, pg_collection)(
        transformer_layer_spec=gpt_block_spec(config, per_layer, te))


def _gpt(model_cfg: ModelConfig, config: TransformerConfig, pg_collection) -> partial:
    """``GPTModel`` for this pipeline stage, less its layer spec."""
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    return partial(GPTModel, config=config, vocab_size=model_cfg.vocab_size,
                   max_sequence_length=model_cfg.seq_length, pre_process=pp_rank == 0,
                   post_process=pp_rank == pp_size - 1,
                   share_embeddings_and_output_weights=model_cfg.tie_embeddings,
                   position_embedding_type="rope", rotary_base=model_cfg.rope_base,
                   pg_collection=pg_collection)


def _register_shared(decoder: torch.nn.Module, pool, shared: SharedRouting) -> None:
    """Register the pool, balance and U once on the decoder; layers keep plain references."""
    for layer in decoder.layers:
        if layer.is_moe_layer:
            del layer.mlp._modules["experts"]
            layer.mlp.__dict__["experts"] = pool
    decoder.expert_pool = pool
    decoder.pool_balance = shared.balance
    if shared.embedding is not None:
        decoder.expert_embedding = shared.embedding


def balance_modules(model_chunks) -> list:
    """The balance modules of a model (one per chunk), for ``parallel.pool_sync``."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, Balance)]


def pipeline_shapes(state_dim: int):
    """``adjust_tensor_shapes_fn`` for Megatron's 1F1B schedule: tensors between stages carry the
    trajectory state after the hidden channels."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(*s[:-1], s[-1] + state_dim) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust if state_dim else None
