"""How big a model is and how much compute a token costs, from its config alone (no weights).

Parameter counts follow the modules ``moue.model.builder`` builds (MLPs without biases, GELU or
SwiGLU, RMSNorm/LayerNorm, RoPE, optional QKV biases, per-head QK norms, tied embeddings and a
shared-expert gate; the same on the local and the Transformer Engine specs, which fuse the norms
into the next linear but keep their weights). ``active_params`` counts the parameters
applied to one token: everything except the pool, plus ``topk`` experts in each MoE layer (U and
the routers count in full). In MoUE an expert reachable from several layers can be applied
several times to the same token, so the active count can exceed the total: it measures compute
per token, which is what a matched baseline must equal.
"""

from __future__ import annotations

from moue.config import ModelConfig, MoEConfig
from moue.model.topology import Topology


def _dims(model: ModelConfig, moe: MoEConfig, topology: Topology | None, sub) -> tuple:
    """(layers, MoE layers, window, pool experts, top-k) of the model, or of the elastic
    sub-model ``sub`` (``moue.elastic.SubModel``: kept layers, kept pool experts, k)."""
    if topology is None:  # dense: the moe section builds nothing
        layers = model.num_layers if sub is None else len(sub.layers)
        return layers, 0, 0, 0, 0
    if sub is None:
        return (model.num_layers, len(model.moe_layers), topology.window, moe.num_experts,
                moe.topk)
    kept_moe = [i for i in model.moe_layers if i in sub.layers]
    window = int(topology.mask_LE[0, list(sub.experts)].sum())  # the same in every layer
    rows = [i // model.moe_layer_freq for i in kept_moe]
    # experts no kept layer can reach are not part of the sub-model (moue-export drops them)
    reachable = int(topology.mask_LE[rows][:, list(sub.experts)].any(dim=0).sum())
    return len(sub.layers), len(kept_moe), window, reachable, sub.topk


def param_counts(model: ModelConfig, moe: MoEConfig, topology: Topology | None,
                 sub=None) -> dict[str, int]:
    """Parameters by part (whole model, all ranks together); ``topology`` None: dense; ``sub``
    an elastic sub-model (what ``moue-export`` keeps of it)."""
    h, heads = model.hidden_size, model.num_attention_heads
    kv = model.kv_channels
    groups = model.num_query_groups or heads
    per_weight = 2 if model.normalization == "LayerNorm" else 1  # LayerNorm: weight and bias
    norm = h * per_weight
    qkv = (heads + 2 * groups) * kv
    attention = (h * qkv + heads * kv * h + norm  # qkv, proj, input norm
                 + (qkv if model.qkv_bias else 0)
                 + (2 * kv * per_weight if model.qk_norm else 0))  # one norm over q, one over k
    layers, n_moe, window, pool, _ = _dims(model, moe, topology, sub)
    return {
        "embedding": model.vocab_size * h,
        "output_layer": 0 if model.tie_embeddings else model.vocab_size * h,
        "attention": layers * attention,
        "dense_mlp": (layers - n_moe) * (mlp_params(model, model.ffn_hidden_size) + norm),
        "moe_norms": n_moe * norm,
        "routers": n_moe * window * h,
        "shared_experts": n_moe * (moe.shared_experts * expert_params(model, moe)
                                   + (h if moe.shared_expert_gate else 0)),
        "pool": pool * expert_params(model, moe),
        "universal_embedding": pool * moe.router_state_dim,
        "final_norm": norm,
    }


def mlp_params(model: ModelConfig, ffn: int) -> int:
    """An MLP's weights: fc1 (twice as wide with SwiGLU: gate and up) and fc2."""
    return (3 if model.activation == "swiglu" else 2) * model.hidden_size * ffn


def expert_params(model: ModelConfig, moe: MoEConfig) -> int:
    return mlp_params(model, moe.expert_ffn_hidden_size)


def active_params(model: ModelConfig, moe: MoEConfig, parts: dict[str, int],
                  topology: Topology | None = None, sub=None) -> int:
    """Parameters applied to one token: all but the pool, plus top-k experts per MoE layer
    (of the sub-model ``sub`` when given, which then needs the ``topology``)."""
    n_moe, topk = len(model.moe_layers), moe.topk
    if sub is not None:
        _, n_moe, _, _, topk = _dims(model, moe, topology, sub)
    routed = n_moe * topk * expert_params(model, moe)
    return sum(parts.values()) - parts["pool"] + routed


def flops_per_token(model: ModelConfig, moe: MoEConfig, topology: Topology | None,
                    sub=None) -> float:
    """Training FLOPs per token (forward + backward): 6 x the non-embedding parameters applied
    to a token (only activated experts: ``topk`` per MoE layer; the output projection also when
    it is tied to the embedding), plus causal attention,
    6 * L * s * h (QK^T and AV, 2 * 2 * s * h per layer forward, halved by the causal mask, x3).
    ``sub``: of that elastic sub-model."""
    parts = param_counts(model, moe, topology, sub)
    applied = active_params(model, moe, parts, topology, sub) - parts["embedding"]
    if model.tie_embeddings:  # the output projection still runs, on the embedding's weights
        applied += model.vocab_size * model.hidden_size
    layers = model.num_layers if sub is None else len(sub.layers)
    return 6.0 * applied + 6.0 * layers * model.seq_length * model.hidden_size


def sizes(model: ModelConfig, moe: MoEConfig, topology: Topology | None, sub=None) -> dict:
    """Parameters total and activated per token, and forward FLOPs per token (a third of the
    training FLOPs), of the model or of the elastic sub-model ``sub``."""
    parts = param_counts(model, moe, topology, sub)
    return {"params_total": sum(parts.values()),
            "params_active": active_params(model, moe, parts, topology, sub),
            "fwd_flops_per_token": flops_per_token(model, moe, topology, sub) / 3}

