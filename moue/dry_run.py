"""What a run would be, computed from its config alone: no weights, no processes.

Parameter counts follow the modules ``moue.model`` builds (local spec: GELU MLPs without biases,
RMSNorm/LayerNorm, untied embeddings, RoPE). ``params_active`` counts the parameters applied to one
token: everything except the pool, plus ``topk`` experts in each MoE layer (U and the routers
count in full). In MoUE an expert reachable from several layers can be applied several times to
the same token, so ``params_active`` can exceed ``params_total``: it measures compute per token,
which is what a matched baseline must equal. The memory estimate covers weights, gradients and Adam states per rank (fp32 master
weights and gradients, Adam moments sharded over data-parallel ranks by the distributed
optimizer), not activations.
"""

from __future__ import annotations

from moue.config import RunConfig
from parallel.layout import ParallelLayout


def param_counts(cfg: RunConfig) -> dict[str, int]:
    """Parameters by part (whole model, all ranks together)."""
    m, moe = cfg.model, cfg.moe
    h, heads = m.hidden_size, m.num_attention_heads
    kv = h // heads
    groups = m.num_query_groups or heads
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    attention = h * (heads + 2 * groups) * kv + heads * kv * h + norm  # qkv, proj, input norm
    n_moe = len(m.moe_layers)
    n_dense = m.num_layers - n_moe
    expert = 2 * h * moe.expert_ffn_hidden_size
    topology = cfg.topology()
    window = topology.window if topology else 0  # dense: the moe section builds nothing
    pool = 0 if m.dense else moe.num_experts
    return {
        "embedding": m.vocab_size * h,
        "output_layer": m.vocab_size * h,
        "attention": m.num_layers * attention,
        "dense_mlp": n_dense * (2 * h * m.ffn_hidden_size + norm),
        "moe_norms": n_moe * norm,
        "routers": n_moe * window * h,
        "shared_experts": n_moe * moe.shared_experts * expert,
        "pool": pool * expert,
        "universal_embedding": pool * moe.router_state_dim,
        "final_norm": norm,
    }


def flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 x the non-embedding parameters applied
    to a token (only activated experts: ``topk`` per MoE layer), plus causal attention,
    6 * L * s * h (QK^T and AV, 2 * 2 * s * h per layer forward, halved by the causal mask, x3)."""
    parts = param_counts(cfg)
    m, moe = cfg.model, cfg.moe
    expert = 2 * m.hidden_size * moe.expert_ffn_hidden_size
    applied = (sum(parts.values()) - parts["pool"] - parts["embedding"]
               + len(m.moe_layers) * moe.topk * expert)
    return 6.0 * applied + 6.0 * m.num_layers * m.seq_length * m.hidden_size


# bf16 dense peak FLOP/s of one GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def report(cfg: RunConfig, world_size: int) -> dict:
    """The dry-run JSON object: sizes, sharing figures, the resolved layout, memory per rank."""
    layout = ParallelLayout(world_size=world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                            ep=cfg.parallel.ep, etp=cfg.parallel.etp)
    m, moe = cfg.model, cfg.moe
    layout.check_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                       num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
                       **moe_dims(cfg), seq_length=m.seq_length)
    parts = param_counts(cfg)
    topology = cfg.topology()
    total = sum(parts.values())
    expert = 2 * m.hidden_size * moe.expert_ffn_hidden_size
    active = total - parts["pool"] + len(m.moe_layers) * moe.topk * expert
    return {
        "params_total": total,
        "params_active": active,
        "params_by_part": parts,
        "num_moe_layers": len(m.moe_layers),
        "topology": moe.topology if topology else "dense",
        "window": topology.window if topology else None,
        "virtual_width": topology.virtual_width if topology else None,
        "reuse_factor": topology.reuse_factor if topology else None,
        "exposure": topology.exposure_E.tolist() if topology else None,
        "train_flops_per_token": flops_per_token(cfg),
        "layout": layout.describe(),
        "memory_gib_per_rank": _memory(parts, layout),
    }


def moe_dims(cfg: RunConfig) -> dict:
    """The expert dimensions ``ParallelLayout.check_model`` checks (none for the dense model)."""
    if cfg.model.dense:
        return {}
    return {"num_experts": cfg.moe.num_experts,
            "expert_ffn_hidden_size": cfg.moe.expert_ffn_hidden_size}


def _memory(parts: dict[str, int], layout: ParallelLayout) -> dict[str, float]:
    pool = parts["pool"] / (layout.ep * layout.etp)  # each stage holds its EP shard of the pool
    dense = (sum(parts.values()) - parts["pool"]) / (layout.tp * layout.pp)
    gib = 2.0**30
    weights_and_grads = (dense + pool) * (4 + 4) / gib
    adam = (dense / layout.dp + pool / layout.edp) * 8 / gib  # two fp32 moments, sharded
    return {"weights_and_grads": round(weights_and_grads, 4), "adam_states": round(adam, 4),
            "total_excluding_activations": round(weights_and_grads + adam, 4)}
