"""The one place where Megatron-Core's ``TransformerConfig`` is built from moue's configs.

Decisions made here (docs/configuration.md):
- Megatron's own load-balancing loss is off (``moe_router_load_balancing_type="none"``): the pool's
  balance (``moue.model.balance``) replaces it; Megatron's would normalise by E, not by the window.
- The router computes in fp32 (``moe_router_dtype="fp32"``) whatever the model precision.
- The dense model (``model.moe_layer_freq=0``) sets none of the ``moe_*`` fields.
- Biases off (``add_bias_linear=False``): Megatron's MoE biases need ETP=1 and break PP=2/EP=1.
- Dropout 0; kernel fusions (bias-activation, RoPE, masked softmax, gradient-accumulation
  fusion) are off on every device for now: they need CUDA kernels, Transformer Engine or
  torch.compile, and the GPU path that turns them on has not landed yet.
- Top-1 routing with post-softmax scores (softmax over the chosen logit: every gate is 1) is
  allowed, though Megatron's ``TransformerConfig`` refuses it: an elastic top-1 sub-model routes
  so, and its export (``moue-export``) must too. The config is built with top-2 and set to 1
  after Megatron's checks. Such a router learns only from the balance loss (``moue-pretrain``
  says so at start); ``moe.pre_softmax=true`` gives it gates that carry gradient.
- With pipeline parallelism, pool and U replicas are summed across stages by Megatron's
  ``_allreduce_conditional_embedding_grads`` (``has_cond_embedder=True``; see parallel.pool_sync).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.config import ModelConfig, MoEConfig
from parallel.layout import ParallelLayout


def top1_post_softmax(moe: MoEConfig) -> bool:
    """Top-1 routing whose gate is a softmax over the chosen logit alone, i.e. always 1."""
    return moe.topk == 1 and moe.score_function == "softmax" and not moe.pre_softmax


def _moe_fields(model: ModelConfig, moe: MoEConfig) -> dict:
    return dict(
        moe_layer_freq=model.moe_layer_freq,
        num_moe_experts=moe.num_experts, moe_router_topk=2 if top1_post_softmax(moe) else moe.topk,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(moe.shared_experts * moe.expert_ffn_hidden_size
                                             if moe.shared_experts else None),
        moe_token_dispatcher_type=moe.dispatcher,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_score_function=moe.score_function, moe_router_pre_softmax=moe.pre_softmax,
        moe_router_dtype="fp32",
    )


def transformer_config(model: ModelConfig, moe: MoEConfig, layout: ParallelLayout, *,
                       device: torch.device,
                       params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    on_gpu = device.type == "cuda"
    config = TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size, normalization=model.normalization,
        **({} if model.dense else _moe_fields(model, moe)),
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
    )
    config.has_cond_embedder = layout.pp > 1  # sum pool/U gradients over pipeline stages
    if not model.dense and top1_post_softmax(moe):
        config.moe_router_topk = 1  # after Megatron's checks (module docstring)
    return config
