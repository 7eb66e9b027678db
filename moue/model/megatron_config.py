"""The one place where Megatron-Core's ``TransformerConfig`` is built from moue's configs.

Decisions made here (docs/configuration.md):
- Megatron's own load-balancing loss is off (``moe_router_load_balancing_type="none"``): the pool's
  balance (``moue.model.balance``) replaces it; Megatron's would normalise by E, not by the window.
- The router computes in fp32 (``moe_router_dtype="fp32"``) whatever the model precision.
- The dense model (``model.moe_layer_freq=0``) sets none of the ``moe_*`` fields.
- Biases off (``add_bias_linear=False``): Megatron's MoE biases need ETP=1 and break PP=2/EP=1.
  ``model.qkv_bias`` adds them to the query/key/value projection alone (Qwen2's attention).
- Dropout 0. Kernel fusions (bias-activation, RoPE, masked softmax) are on with Transformer
  Engine's layers (``Plan.fusions``: a GPU with Transformer Engine, which brings the kernels) and
  off with Megatron-Core's local layers, which have no kernels for them on CPUs or without
  Transformer Engine / apex. Gradient-accumulation fusion also needs apex's
  ``fused_weight_gradient_mlp_cuda`` (Megatron's own output layer uses it): ``Plan.grad_accum_fusion``.
- ``model.activation=swiglu`` is Megatron's gated linear unit with SiLU (``linear_fc1`` holds
  gate and up, gate first) for experts, shared experts and dense layers alike.
- ``train.precision=fp8`` keeps bf16 weights and runs Transformer Engine's FP8 GEMMs with the
  ``hybrid`` format (E4M3 forward, E5M2 gradients) and ``train.fp8_recipe``. The grouped pool
  pads each expert's tokens for the quantized GEMM (``moe_router_padding_for_quantization`` is
  left off: Megatron's ``TEGroupedMLP`` pads and unpads itself, and the universal router builds
  its own routing map). Recompute follows ``train.recompute`` (``moue.model.recompute``: its rules and fields).
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
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.config import ModelConfig, MoEConfig, TrainConfig
from moue.model.recompute import megatron_fields
from parallel.capability import Plan
from parallel.layout import ParallelLayout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def top1_post_softmax(moe: MoEConfig) -> bool:
    """Top-1 routing whose gate is a softmax over the chosen logit alone, i.e. always 1."""
    return moe.topk == 1 and moe.score_function == "softmax" and not moe.pre_softmax


def _moe_fields(model: ModelConfig, moe: MoEConfig, plan: Plan) -> dict:
    return dict(
        moe_layer_freq=model.moe_layer_freq,
        num_moe_experts=moe.num_experts, moe_router_topk=2 if top1_post_softmax(moe) else moe.topk,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(moe.shared_experts * moe.expert_ffn_hidden_size
                                             if moe.shared_experts else None),
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_token_dispatcher_type=moe.dispatcher,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_score_function=moe.score_function, moe_router_pre_softmax=moe.pre_softmax,
        moe_router_dtype="fp32", moe_grouped_gemm=plan.expert_impl == "grouped",
    )


def _precision_fields(plan: Plan) -> dict:
    dtype = DTYPES[plan.precision]
    fields = dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    if plan.precision == "fp8":
        fields.update(fp8="hybrid", fp8_recipe=plan.fp8_recipe)
    return fields


def _fusion_fields(plan: Plan, swiglu: bool) -> dict:
    on = plan.fusions
    # Megatron fuses the activation with a bias, or SwiGLU without one; moue has no biases.
    return dict(bias_dropout_fusion=on, masked_softmax_fusion=on,
                bias_activation_fusion=on and swiglu,
                gradient_accumulation_fusion=plan.grad_accum_fusion, apply_rope_fusion=on,
                persist_layer_norm=False)


def transformer_config(model: ModelConfig, moe: MoEConfig, layout: ParallelLayout, plan: Plan, *,
                       device: torch.device, train: TrainConfig,
                       initialise: bool = True) -> TransformerConfig:
    """Megatron's config for ``plan`` (``parallel.capability.plan``) on ``device``;
    ``initialise=False``: Megatron leaves the weights uninitialised (their values come from a
    checkpoint or a conversion)."""
    on_gpu = device.type == "cuda"
    swiglu = model.activation == "swiglu"
    config = TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels, ffn_hidden_size=model.ffn_hidden_size, normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon, qk_layernorm=model.qk_norm,
        add_qkv_bias=model.qkv_bias,
        **({} if model.dense else _moe_fields(model, moe, plan)),
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        **_fusion_fields(plan, swiglu), **_precision_fields(plan),
        **megatron_fields(train.recompute, train.recompute_modules),
        use_cpu_initialization=not on_gpu, perform_initialization=initialise,
    )
    config.has_cond_embedder = layout.pp > 1  # sum pool/U gradients over pipeline stages
    if not model.dense and top1_post_softmax(moe):
        config.moe_router_topk = 1  # after Megatron's checks (module docstring)
    return config
