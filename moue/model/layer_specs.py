"""Layer specs: Megatron-Core's own spec functions, local or Transformer Engine
(``Plan.transformer_impl``), carrying the MoUE layer, the universal router and the shared pool.

With Transformer Engine (``get_gpt_layer_with_transformer_engine_spec``) attention is TE's fused
attention and the norms are fused into the next linear (``linear_qkv.layer_norm_weight``);
Megatron's local spec keys its norms the same way in checkpoints, so a config gets the same
initial weights on either spec (``moue.model.init`` draws each weight from its key). The pool
takes TE's linears from the TE spec; with the local spec, the grouped pool takes torch's grouped
GEMM (``moue.model.te_standins``), and so does the sequential pool's experts' linears under
gradient-accumulation fusion (their TE stand-ins, which keep TE's weight-gradient contract).

Megatron-Core's local spec normalises with ``WrappedTorchNorm``, which refuses sequence
parallelism (``assert not config.sequence_parallel``, megatron/core/transformer/torch_norm.py) -
on CPUs and on GPUs without Transformer Engine or apex alike. Under sequence parallelism a norm
acts on a sequence shard, and its weights are replicated over the tensor-parallel group; all it
needs is that their gradients are summed over that group, which Megatron's
``finalize_model_grads`` does for parameters tagged ``sequence_parallel=True``.
``SequenceParallelTorchNorm`` builds the torch norm and tags its parameters so.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    """A torch LayerNorm/RMSNorm usable with sequence parallelism (see module docstring)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        unsharded = copy.copy(config)  # a shallow copy: __post_init__ must not run again
        unsharded.sequence_parallel = False
        norm = WrappedTorchNorm(unsharded, hidden_size, eps=eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def submodules_of(spec):
    """The submodules of a spec: a ModuleSpec (megatron-core 0.16) or a partial (0.19)."""
    return spec.submodules if isinstance(spec, ModuleSpec) else spec.keywords["submodules"]


def _replace_norms(spec: ModuleSpec) -> ModuleSpec:
    """Swap WrappedTorchNorm for SequenceParallelTorchNorm in a layer spec's submodules."""
    for name in ("input_layernorm", "pre_mlp_layernorm", "pre_cross_attn_layernorm"):
        if getattr(spec.submodules, name, None) is WrappedTorchNorm:
            setattr(spec.submodules, name, SequenceParallelTorchNorm)
    attention = getattr(spec.submodules, "self_attention", None)
    if attention is not None:
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attention.submodules, name, None) is WrappedTorchNorm:
                setattr(attention.submodules, name, SequenceParallelTorchNorm)
    return spec


def _layer_spec(config: TransformerConfig, num_experts: int | None, te: bool) -> ModuleSpec:
    """Megatron-Core's GPT layer spec (TE or local with sequence-parallel-safe norms)."""
    if te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
    return _replace_norms(get_gpt_layer_local_spec(
        num_experts=num_experts, normalization=config.normalization,
        qk_layernorm=config.qk_layernorm))


def _final_norm(te: bool):
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelTorchNorm


def torch_grouped_experts_spec() -> ModuleSpec:
    """``TEGroupedMLP`` over torch's grouped GEMM (``moue.model.te_standins``)."""
    from moue.model.te_standins import TorchGroupedLinear, TorchRowParallelGroupedLinear

    try:  # megatron-core 0.19 has its own submodules class for the grouped MLP
        from megatron.core.transformer.moe.experts import GroupedMLPSubmodules as Submodules
    except ImportError:
        from megatron.core.transformer.mlp import MLPSubmodules as Submodules
    return ModuleSpec(module=TEGroupedMLP, submodules=Submodules(
        linear_fc1=TorchGroupedLinear, linear_fc2=TorchRowParallelGroupedLinear))


def local_experts_spec(config: TransformerConfig, local_spec):
    """The pool's experts on the local layers: the grouped pool on torch's grouped GEMM; the
    sequential pool on Megatron's local linears, or under gradient-accumulation fusion on their
    stand-ins for TE's (the weight-gradient contract TE's sequential pool runs under)."""
    if config.moe_grouped_gemm:
        return torch_grouped_experts_spec()
    if not config.gradient_accumulation_fusion:
        return local_spec
    from moue.model.te_standins import TorchExpertColumnLinear, TorchExpertRowLinear

    spec = copy.deepcopy(local_spec)
    mlp = submodules_of(spec)
    mlp.linear_fc1, mlp.linear_fc2 = TorchExpertColumnLinear, TorchExpertRowLinear
    return spec


def gpt_block_spec(config: TransformerConfig, num_experts: int | None,
                   te: bool = False) -> TransformerBlockSubmodules:
    """Megatron-Core's GPT layer spec (TE, or local with sequence-parallel-safe norms) for every
    layer (the dense model, or Megatron's own MoE). Returned as block submodules (for this
    pipeline stage's layers) so the final norm matches the spec."""
    layer = _layer_spec(config, num_experts, te)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=_final_norm(te))


def moue_block_spec(config: TransformerConfig, *, moe_layer_freq: int, state_dim: int,
                    router, experts_factory, pp_rank: int, te: bool) -> TransformerBlockSubmodules:
    """This stage's layers: MoUE layers (shared pool, universal router) every ``moe_layer_freq``
    layers and dense layers between them, all carrying the trajectory state.

    ``router`` is the ``MoESubmodules.router`` builder, ``experts_factory`` the class returning
    the stage's one pool (``moue.model.pool.shared_pool_factory``) from the experts' spec.
    """
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from moue.model.layer import MoUETransformerLayer

    def layer_spec(is_moe: bool) -> ModuleSpec:
        spec = _layer_spec(config, config.num_moe_experts if is_moe else None, te)
        spec.module = MoUETransformerLayer
        spec.params = {**(spec.params or {}), "state_dim": state_dim}
        if is_moe:
            moe = submodules_of(spec.submodules.mlp)
            moe.router = router
            moe.experts = experts_factory(moe.experts if te
                                          else local_experts_spec(config, moe.experts))
        return spec

    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    kinds = [(offset + i) % moe_layer_freq == 0 for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=[layer_spec(k) for k in kinds],
                                      layer_norm=_final_norm(te))
