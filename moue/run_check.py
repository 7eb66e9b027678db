"""The one check of a run against the processes it will have, shared by ``--dry-run``, the
launch and the Trainer: the layout divides the world, the model's dimensions split under it, and
the global batch splits into micro-batches on every data-parallel rank. Each failure is a
``UserError`` naming the field, its value and the fix, raised before any process group exists.
"""

from __future__ import annotations

import math

from moue.config import RunConfig
from parallel.capability import Capabilities, Plan, plan
from parallel.errors import UserError
from parallel.layout import ParallelLayout


def plan_run(cfg: RunConfig, caps: Capabilities | None = None) -> Plan:
    """How ``cfg`` is built on a machine with ``caps`` (None: this one): layer spec, pool,
    precision; a ``UserError`` when the machine cannot serve the request."""
    m, moe, t = cfg.model, cfg.moe, cfg.train
    result = plan(caps or Capabilities.detect(), transformer_impl=m.transformer_impl,
                  expert_impl=moe.expert_impl, precision=t.precision, fp8_recipe=t.fp8_recipe,
                  has_experts=not m.dense)
    if "layernorm" in (t.recompute_modules or []) and result.transformer_impl != "transformer_engine":
        # tensor_parallel.CheckpointWithoutOutput() reads Transformer Engine's FP8 state even
        # when FP8 is off (megatron-core 0.16.1 and 0.19): a NameError without TE.
        raise UserError("train.recompute_modules: 'layernorm' needs Transformer Engine's layers "
                        "(Megatron-Core's norm recompute calls into Transformer Engine); leave it "
                        "out, or run where model.transformer_impl resolves to transformer_engine")
    if result.grouped_gemm == "torch":  # torch._grouped_mm wants rows aligned to 16 bytes
        # (SwiGLU's gate and up, twice the expert FFN, are aligned when the FFN is.)
        align = 16 // (2 if result.precision == "bf16" else 4)
        p = cfg.parallel
        etp = ParallelLayout.default_etp(p.tp, p.ep) if p.etp is None else p.etp
        for name, value, split in (("model.hidden_size", m.hidden_size, 1),
                                   ("moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size, etp)):
            if (value // split) % align:
                raise UserError(f"{name}={value}: torch's grouped GEMM (moe.expert_impl=grouped "
                                f"without Transformer Engine) needs it, per expert-tensor-parallel "
                                f"rank, a multiple of {align} in {result.precision}; change it or "
                                "use moe.expert_impl=sequential")
    return result


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
