"""The one check of a run against the processes it will have, shared by ``--dry-run``, the
launch and the Trainer: the layout divides the world, the model's dimensions split under it, and
the global batch splits into micro-batches on every data-parallel rank. Each failure is a
``UserError`` naming the field, its value and the fix, raised before any process group exists.
"""

from __future__ import annotations

import math

from moue.config import RunConfig
from moue.elastic.microbatch import full_microbatches
from moue.model.recompute import NEEDS_TRANSFORMER_ENGINE
from parallel.capability import Capabilities, Plan, plan
from parallel.errors import UserError
from parallel.layout import ParallelLayout


def plan_run(cfg: RunConfig, caps: Capabilities | None = None) -> Plan:
    """How ``cfg`` is built on a machine with ``caps`` (None: this one): layer spec, pool,
    precision; a ``UserError`` when the machine cannot serve the request."""
    m, moe, t = cfg.model, cfg.moe, cfg.train
    result = plan(caps or Capabilities.detect(), transformer_impl=m.transformer_impl,
                  expert_impl=moe.expert_impl, precision=t.precision, fp8_recipe=t.fp8_recipe,
                  has_experts=not m.dense, grad_accum_fusion=t.grad_accum_fusion)
    if result.transformer_impl != "transformer_engine":
        for name in t.recompute_modules or []:
            if name in NEEDS_TRANSFORMER_ENGINE:
                raise UserError(f"train.recompute_modules: {name!r} "
                                f"{NEEDS_TRANSFORMER_ENGINE[name]}")
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
    if result.precision == "fp8":
        _check_fp8_alignment(cfg, result.fp8_recipe)
    return result


def fp8_gemms(cfg: RunConfig) -> list[tuple[str, str, int, int]]:
    """The GEMM dimensions Transformer Engine's FP8 checks on one rank, as (what, the field that
    sets it, size, the multiple FP8 needs): TE's ``assert_dim_for_fp8_exec`` wants of each GEMM
    operand (the input [tokens, in] and the weight [out, in]) its first dimension a multiple of
    8 and its last of 16. Experts' token counts are padded by Megatron itself."""
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    tp = p.tp
    etp = ParallelLayout.default_etp(p.tp, p.ep) if p.etp is None else p.etp
    groups = m.num_query_groups or m.num_attention_heads
    dims = [("the tokens of a micro-batch", "model.seq_length x train.micro_batch_size",
             m.seq_length * cfg.train.micro_batch_size, 8),
            ("the hidden size (the input of linear_qkv and linear_fc1)", "model.hidden_size",
             m.hidden_size, 16),
            ("attention's linear_qkv output", "model.head_dim (or the heads and query groups) "
             "/ parallel.tp", (m.num_attention_heads + 2 * groups) * m.kv_channels // tp, 8),
            ("attention's linear_proj input", "model.head_dim (or model.num_attention_heads) "
             "/ parallel.tp", m.num_attention_heads * m.kv_channels // tp, 16)]
    if m.dense or m.moe_layer_freq > 1:
        dims.append(("the dense MLP's linear_fc2 input", "model.ffn_hidden_size / parallel.tp",
                     m.ffn_hidden_size // tp, 16))
    if not m.dense:
        dims.append(("an expert's linear_fc2 input", "moe.expert_ffn_hidden_size / ETP",
                     moe.expert_ffn_hidden_size // etp, 16))
        if moe.shared_experts:
            dims.append(("the shared experts' linear_fc2 input", "moe.expert_ffn_hidden_size x "
                         "moe.shared_experts / parallel.tp",
                         moe.shared_experts * moe.expert_ffn_hidden_size // tp, 16))
    return dims


def _check_fp8_alignment(cfg: RunConfig, recipe: str) -> None:
    """Refuse, naming the field, GEMM sizes Transformer Engine's quantized GEMMs reject at the
    first forward: FP8 as ``fp8_gemms`` says, MXFP8 every dimension a multiple of its 32-wide
    scaling blocks."""
    for what, field, size, multiple in fp8_gemms(cfg):
        multiple = 32 if recipe == "mxfp8" else multiple
        if size % multiple:
            raise UserError(
                f"train.precision=fp8 (train.fp8_recipe={recipe}): Transformer Engine's "
                f"{'MXFP8' if recipe == 'mxfp8' else 'FP8'} GEMMs need {what} a multiple of "
                f"{multiple}, and it is {size} on each rank ({field}); change "
                f"{field.split(' ')[0]} so it is, or use train.precision=bf16")


SCORES_SHARE = 0.2  # of the GPU's memory, above which the local spec's attention scores warn


def local_attention_warning(cfg: RunConfig, plan: Plan, caps: Capabilities) -> str | None:
    """A warning when Megatron-Core's local layers run on a GPU at a sequence length whose
    attention scores would take more than ``SCORES_SHARE`` of its memory.

    The local ``DotProductAttention`` materialises ``[b, heads/tp, s, s]`` scores and keeps the
    softmax's output for the backward pass, in every layer of the stage (one at a time under
    full recompute); Transformer Engine's fused attention keeps none."""
    if not caps.cuda or plan.transformer_impl != "local" or not caps.memory_bytes:
        return None
    m, p, t = cfg.model, cfg.parallel, cfg.train
    layers = 1 if t.recompute == "full" else math.ceil(m.num_layers / p.pp)
    width = 4 if plan.precision == "fp32" else 2
    scores = layers * t.micro_batch_size * (m.num_attention_heads // p.tp) * m.seq_length**2 * width
    if scores <= SCORES_SHARE * caps.memory_bytes:
        return None
    gib = 2**30
    return (f"model.transformer_impl resolved to local on {caps.device_name or 'this GPU'}: "
            f"Megatron-Core's local attention keeps the s x s scores, about {scores / gib:.1f} GiB "
            f"for this stage's {layers} layer(s) at model.seq_length={m.seq_length} and "
            f"train.micro_batch_size={t.micro_batch_size} ({scores / caps.memory_bytes:.0%} of "
            f"the GPU's {caps.memory_bytes / gib:.0f} GiB); run in the GPU image (docker/: "
            "Transformer Engine's fused attention keeps no scores) with "
            "model.transformer_impl=auto, or lower model.seq_length, or set train.recompute=full")


def smallest_world(cfg: RunConfig) -> int:
    """The fewest processes the configured (tp, pp, ep, etp) needs: both the dense part
    (tp*pp) and the expert part (etp*ep*pp) must divide the world."""
    p = cfg.parallel
    etp = ParallelLayout.default_etp(p.tp, p.ep) if p.etp is None else p.etp
    return math.lcm(p.tp * p.pp, etp * p.ep * p.pp)


def check_training(cfg: RunConfig) -> None:
    """What only training needs of ``cfg`` (evaluation and conversion read the same config with
    other batch sizes): elastic micro-batches of both kinds in a step."""
    e, t = cfg.elastic, cfg.train
    if not (e.enabled and e.granularity == "microbatch") or cfg.model.dense:
        return
    count = t.global_batch_size // t.micro_batch_size
    full = full_microbatches(e.full_share, count)
    if not (e.full_share == 1 or 0 < full < count):
        raise UserError(
            f"elastic.full_share={e.full_share}: leaves no micro-batch for "
            f"{'sub-models' if full == count else 'the full model'} in a step of {count} "
            f"(train.global_batch_size={t.global_batch_size} / train.micro_batch_size="
            f"{t.micro_batch_size}): lower train.micro_batch_size (4 micro-batches put 3 on the "
            "full model) or set elastic.granularity=step")


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
