"""How big a model is and how much compute a token costs, from its config alone (no weights).

Parameter counts follow the modules ``moue.model.builder`` builds (local spec: GELU MLPs without
biases, RMSNorm/LayerNorm, untied embeddings, RoPE). ``active_params`` counts the parameters
applied to one token: everything except the pool, plus ``topk`` experts in each MoE layer (U and
the routers count in full). In MoUE an expert reachable from several layers can be applied
several times to the same token, so the active count can exceed the total: it measures compute
per token, which is what a matched baseline must equal.
"""

from __future__ import annotations

from moue.config import ModelConfig, MoEConfig
from moue.model.topology import Topology


def param_counts(model: ModelConfig, moe: MoEConfig, topology: Topology | None) -> dict[str, int]:
    """Parameters by part (whole model, all ranks together); ``topology`` None: dense."""
    h, heads = model.hidden_size, model.num_attention_heads
    kv = h // heads
    groups = model.num_query_groups or heads
    norm = h * (2 if model.normalization == "LayerNorm" else 1)
    attention = h * (heads + 2 * groups) * kv + heads * kv * h + norm  # qkv, proj, input norm
    n_moe = len(model.moe_layers)
    n_dense = model.num_layers - n_moe
    window = topology.window if topology else 0  # dense: the moe section builds nothing
    pool = moe.num_experts if topology else 0
    return {
        "embedding": model.vocab_size * h,
        "output_layer": model.vocab_size * h,
        "attention": model.num_layers * attention,
        "dense_mlp": n_dense * (2 * h * model.ffn_hidden_size + norm),
        "moe_norms": n_moe * norm,
        "routers": n_moe * window * h,
        "shared_experts": n_moe * moe.shared_experts * expert_params(model, moe),
        "pool": pool * expert_params(model, moe),
        "universal_embedding": pool * moe.router_state_dim,
        "final_norm": norm,
    }


def expert_params(model: ModelConfig, moe: MoEConfig) -> int:
    return 2 * model.hidden_size * moe.expert_ffn_hidden_size


def active_params(model: ModelConfig, moe: MoEConfig, parts: dict[str, int]) -> int:
    """Parameters applied to one token: all but the pool, plus top-k experts per MoE layer."""
    routed = len(model.moe_layers) * moe.topk * expert_params(model, moe)
    return sum(parts.values()) - parts["pool"] + routed


def flops_per_token(model: ModelConfig, moe: MoEConfig, topology: Topology | None) -> float:
    """Training FLOPs per token (forward + backward): 6 x the non-embedding parameters applied
    to a token (only activated experts: ``topk`` per MoE layer), plus causal attention,
    6 * L * s * h (QK^T and AV, 2 * 2 * s * h per layer forward, halved by the causal mask, x3)."""
    parts = param_counts(model, moe, topology)
    applied = active_params(model, moe, parts) - parts["embedding"]
    return 6.0 * applied + 6.0 * model.num_layers * model.seq_length * model.hidden_size
