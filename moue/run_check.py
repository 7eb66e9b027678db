"""The one check of a run against the processes it will have, shared by ``--dry-run``, the
launch and the Trainer: the layout divides the world, the model's dimensions split under it, and
the global batch splits into micro-batches on every data-parallel rank. Each failure is a
``UserError`` naming the field, its value and the fix, raised before any process group exists.
"""

from __future__ import annotations

import math

from moue.config import RunConfig
from parallel.errors import UserError
from parallel.layout import ParallelLayout


def smallest_world(cfg: RunConfig) -> int:
    """The fewest processes the configured (tp, pp, ep, etp) needs: both the dense part
    (tp*pp) and the expert part (etp*ep*pp) must divide the world."""
    p = cfg.parallel
    etp = ParallelLayout.default_etp(p.tp, p.ep) if p.etp is None else p.etp
    return math.lcm(p.tp * p.pp, etp * p.ep * p.pp)


def check_run(cfg: RunConfig, world_size: int | None = None) -> ParallelLayout:
    """The validated layout of ``cfg`` on ``world_size`` processes (None: the smallest world
    the layout needs)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    world = smallest_world(cfg) if world_size is None else world_size
    layout = ParallelLayout(world_size=world, tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp)
    experts = {} if m.dense else {"num_experts": cfg.moe.num_experts,
                                  "expert_ffn_hidden_size": cfg.moe.expert_ffn_hidden_size}
    layout.check_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                       num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
                       seq_length=m.seq_length, **experts)
    per_stage = m.num_layers // layout.pp
    if not m.dense and per_stage % m.moe_layer_freq:
        raise UserError(
            f"model.moe_layer_freq={m.moe_layer_freq} must divide the {per_stage} layers of each "
            f"pipeline stage (parallel.pp={layout.pp}): every stage holds a replica of the pool "
            "and needs MoE layers of its own")
    if t.global_batch_size % (t.micro_batch_size * layout.dp):
        fits = [d for d in range(1, t.global_batch_size + 1)
                if t.global_batch_size % (t.micro_batch_size * d) == 0]
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x data-parallel ranks = {t.micro_batch_size} x {layout.dp} "
            f"(world size {world} / (tp={layout.tp} x pp={layout.pp})); change the batch sizes, "
            f"or launch a world whose data-parallel degree is one of {fits}")
    return layout
