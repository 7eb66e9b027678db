"""What a run would be, computed from its config alone: no weights, no processes.

Sizes and FLOPs come from ``moue.model.size``. The memory estimate covers weights, gradients and
Adam states per rank (fp32 master weights and gradients, Adam moments sharded over data-parallel
ranks by the distributed optimizer), not activations. With ``elastic.enabled`` it lists the
family's sub-models with their sizes (what ``moue-eval --family`` evaluates). ``implementation``
says how the run would be built (layer spec, pool, precision, fusions) on this machine and on a
GPU machine with Transformer Engine (an H100), or why that machine would refuse it.
"""

from __future__ import annotations

from moue.config import RunConfig
from moue.elastic.submodel import family
from moue.model.size import active_params, flops_per_token, param_counts, sizes
from moue.run_check import check_run, check_training, plan_run
from parallel.capability import Capabilities
from parallel.errors import UserError
from parallel.layout import ParallelLayout


def report(cfg: RunConfig, world_size: int | None = None) -> dict:
    """The dry-run JSON object: sizes, sharing figures, the resolved layout, memory per rank.
    ``world_size`` None: the smallest world the layout needs."""
    layout = check_run(cfg, world_size)
    check_training(cfg)
    m, moe, topology = cfg.model, cfg.moe, cfg.topology()
    parts = param_counts(m, moe, topology)
    return {
        "params_total": sum(parts.values()),
        "params_active": active_params(m, moe, parts),
        "params_by_part": parts,
        "num_moe_layers": len(m.moe_layers),
        "topology": moe.topology if topology else "dense",
        "window": topology.window if topology else None,
        "virtual_width": topology.virtual_width if topology else None,
        "reuse_factor": topology.reuse_factor if topology else None,
        "exposure": topology.exposure_E.tolist() if topology else None,
        "train_flops_per_token": flops_per_token(m, moe, topology),
        "layout": layout.describe(),
        "memory_gib_per_rank": _memory(parts, layout),
        "implementation": {"this_machine": _plan(cfg, None),
                           "gpu_with_transformer_engine": _plan(cfg, Capabilities.reference_gpu())},
        "elastic_family": ([{"submodel": sub.label, **sizes(m, moe, topology, sub)}
                            for sub in family(cfg.elastic_choices())]
                           if cfg.elastic.enabled else None),
    }


def _plan(cfg: RunConfig, caps: Capabilities | None) -> dict:
    try:
        return plan_run(cfg, caps).describe()
    except UserError as err:
        return {"refused": str(err)}


def _memory(parts: dict[str, int], layout: ParallelLayout) -> dict[str, float]:
    pool = parts["pool"] / (layout.ep * layout.etp)  # each stage holds its EP shard of the pool
    dense = (sum(parts.values()) - parts["pool"]) / (layout.tp * layout.pp)
    gib = 2.0**30
    weights_and_grads = (dense + pool) * (4 + 4) / gib
    adam = (dense / layout.dp + pool / layout.edp) * 8 / gib  # two fp32 moments, sharded
    return {"weights_and_grads": round(weights_and_grads, 4), "adam_states": round(adam, 4),
            "total_excluding_activations": round(weights_and_grads + adam, 4)}
