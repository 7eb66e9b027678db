"""The Hugging Face MoE families moue converts, and the one name mapping between them and moue.

Both directions go through the same table (``_layer_names``): per layer, canonical parts
(``q``, ``k``, ``v``, ``o``, norms, ``router``, each expert's ``gate``/``up``/``down``, the shared
expert and its gate, a dense MLP) named once for Hugging Face and once for moue. What differs
between the layouts (docs/conversion.md has the full table):

- attention: Hugging Face keeps ``q_proj``, ``k_proj``, ``v_proj``; Megatron packs them into one
  ``linear_qkv`` per query group ``g``: ``[q of the g-th group's heads, k_g, v_g]``;
- SwiGLU MLPs: Hugging Face's ``gate_proj``/``up_proj`` (Mixtral: ``w1``/``w3``) are Megatron's
  ``linear_fc1`` = ``cat(gate, up)``, gate first; ``down_proj`` (``w2``) is ``linear_fc2``;
- experts: Hugging Face layer ``l``'s expert ``j`` is moue pool expert ``S_l[j]``, the ``j``-th
  of layer ``l``'s window in ascending pool order, and router row ``j`` (the standard topology:
  ``S_l = l*N .. l*N+N-1``). Hugging Face files hold experts one by one
  (``experts.{j}.gate_proj``, as ``save_pretrained`` writes them) or fused
  (``experts.gate_up_proj`` [N, 2I, h], ``experts.down_proj`` [N, h, I]); both are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moue.commands.standalone import POOL_EXPERTS, one_process_state
from moue.config import RunConfig
from parallel.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    moe_prefix: str  # the MoE block's name in a layer
    expert_names: tuple[str, str, str]  # gate, up, down
    shared_expert: bool = False
    qk_norm: bool = False
    qkv_bias_key: str | None = None  # config.json field for q/k/v biases (None: never)
    norm_topk_key: str | None = None  # config.json field for renormalised top-k (None: always)
    experts_key: str = "num_experts"
    expert_size_key: str = "moe_intermediate_size"


MIXTRAL = Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                 experts_key="num_local_experts", expert_size_key="intermediate_size")
QWEN2_MOE = Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                   shared_expert=True, qkv_bias_key="qkv_bias", norm_topk_key="norm_topk_prob")
QWEN3_MOE = Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                   qk_norm=True, qkv_bias_key="attention_bias", norm_topk_key="norm_topk_prob")
FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
SUPPORTED = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def family_of(hf: dict, where: str) -> Family:
    """The family of a ``config.json``; unsupported ones are named with the supported list."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    found = FAMILIES.get(model_type) or next(
        (f for f in FAMILIES.values() if f.architecture in archs), None)
    if found is None:
        raise UserError(f"{where}: model_type={model_type!r} (architectures {archs}) is not a "
                        f"family moue converts; supported: {SUPPORTED}")
    return found


# --- config.json <-> moue's model and moe sections ---

def _field(hf: dict, key: str, where: str, default=None):
    value = hf.get(key, default)
    if value is None:
        raise UserError(f"{where}: has no {key!r}, which a {hf.get('model_type')} config "
                        "needs; the file is incomplete: download it again")
    return value


def _rope_base(hf: dict, where: str) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not built in moue (plain RoPE "
                        "only); convert a checkpoint without rope_scaling")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _moe_layers(hf: dict, where: str) -> int:
    """``model.moe_layer_freq`` for the config's sparse layers (every k-th, from layer 0)."""
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(layers)]
    for freq in range(1, layers + 1):
        if all(s == (i % freq == 0) for i, s in enumerate(sparse)):
            return freq
    raise UserError(f"{where}: decoder_sparse_step={step}, mlp_only_layers={sorted(dense)} make "
                    f"layers {[i for i, s in enumerate(sparse) if s]} sparse; moue's MoE layers "
                    "are every k-th layer from layer 0 (model.moe_layer_freq)")


def moue_sections(hf: dict, family: Family, where: str) -> dict:
    """moue's ``model`` and ``moe`` sections (a standard topology) for a ``config.json``."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act={hf['hidden_act']!r}; moue's SwiGLU uses silu")
    sliding = hf.get("use_sliding_window", family is MIXTRAL and hf.get("sliding_window"))
    if sliding:
        raise UserError(f"{where}: sliding-window attention (sliding_window="
                        f"{hf.get('sliding_window')}) is not built in moue; convert a checkpoint "
                        "with full attention")
    layers, hidden = _field(hf, "num_hidden_layers", where), _field(hf, "hidden_size", where)
    heads = _field(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim") or hidden // heads
    freq = _moe_layers(hf, where)
    n = _field(hf, family.experts_key, where, hf.get("num_experts", hf.get("num_local_experts")))
    expert_size = _field(hf, family.expert_size_key, where)
    shared = (hf.get("shared_expert_intermediate_size") or 0) if family.shared_expert else 0
    if shared % expert_size:
        raise UserError(f"{where}: shared_expert_intermediate_size={shared} is not a multiple "
                        f"of {family.expert_size_key}={expert_size}; moue's shared experts are "
                        "whole experts (moe.shared_experts x moe.expert_ffn_hidden_size)")
    if family.qk_norm and hf.get("attention_bias"):
        raise UserError(f"{where}: attention_bias=true also biases o_proj, which moue's "
                        "attention does not have (model.qkv_bias covers q, k and v)")
    renormalise = bool(hf.get(family.norm_topk_key, False)) if family.norm_topk_key else True
    n_moe = len(range(0, layers, freq))
    model = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 num_query_groups=hf.get("num_key_value_heads") or heads,
                 head_dim=None if head_dim * heads == hidden else head_dim,
                 vocab_size=_field(hf, "vocab_size", where),
                 ffn_hidden_size=hf.get("intermediate_size") or expert_size,
                 moe_layer_freq=freq, normalization="RMSNorm", activation="swiglu",
                 rope_base=_rope_base(hf, where), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                 qk_norm=family.qk_norm,
                 qkv_bias=bool(hf.get(family.qkv_bias_key, family is QWEN2_MOE)
                               if family.qkv_bias_key else False),
                 tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    moe = dict(num_experts=n_moe * n, expert_ffn_hidden_size=expert_size,
               topk=_field(hf, "num_experts_per_tok", where), topology="standard", window=n,
               stride=n, shared_experts=shared // expert_size,
               shared_expert_gate=bool(shared), router_state_dim=0, score_function="softmax",
               pre_softmax=not renormalise, balance="per_layer",
               balance_coeff=float(hf.get("router_aux_loss_coef", 1e-2)))
    return {"model": model, "moe": moe}


def hf_config(cfg: RunConfig, family: Family) -> dict:
    """The ``config.json`` of ``cfg``'s model in ``family``: each MoE layer's window becomes its
    experts (standard topology: its own block; MoUE: private copies of the window)."""
    m, moe = cfg.model, cfg.moe
    topology = cfg.topology()
    dense = [i for i in range(m.num_layers) if i not in set(m.moe_layers)]
    hf = {"architectures": [family.architecture], "model_type": family.model_type,
          "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
          "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
          "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
          "head_dim": m.kv_channels, "hidden_act": "silu", "max_position_embeddings": m.seq_length,
          "rms_norm_eps": m.norm_epsilon, "rope_theta": m.rope_base,
          "rope_parameters": {"rope_theta": m.rope_base, "rope_type": "default"},
          "tie_word_embeddings": m.tie_embeddings, "num_experts_per_tok": moe.topk,
          family.experts_key: topology.window, "router_aux_loss_coef": moe.balance_coeff,
          "attention_dropout": 0.0, "use_cache": True}
    if family is MIXTRAL:
        hf.update(intermediate_size=moe.expert_ffn_hidden_size, sliding_window=None)
    else:
        hf.update(intermediate_size=m.ffn_hidden_size,
                  moe_intermediate_size=moe.expert_ffn_hidden_size, decoder_sparse_step=1,
                  mlp_only_layers=dense, norm_topk_prob=not moe.pre_softmax,
                  use_sliding_window=False, sliding_window=None)
        hf[family.qkv_bias_key] = m.qkv_bias
    if family.shared_expert:
        hf["shared_expert_intermediate_size"] = moe.shared_experts * moe.expert_ffn_hidden_size
    return hf


def unsupported_export(cfg: RunConfig, family: Family) -> str | None:
    """Why ``cfg``'s model cannot be written as ``family`` (None: it can)."""
    m, moe = cfg.model, cfg.moe
    reasons = [
        (m.dense, "it is the dense model (no experts)"),
        (moe.router_state_dim > 0, f"its routers read the trajectory state (moe.router_state_dim="
         f"{moe.router_state_dim}), which no Hugging Face family has"),
        (moe.score_function != "softmax", f"moe.score_function={moe.score_function!r} (the "
         "families route with softmax)"),
        (m.normalization != "RMSNorm", f"model.normalization={m.normalization!r} (RMSNorm only)"),
        (m.activation != "swiglu", f"model.activation={m.activation!r} (SwiGLU only)"),
        (m.qk_norm != family.qk_norm, f"model.qk_norm={m.qk_norm} ({family.model_type} "
         f"{'always has' if family.qk_norm else 'has no'} per-head q/k norms)"),
        (m.qkv_bias and not family.qkv_bias_key, f"model.qkv_bias=true ({family.model_type} has "
         "no q/k/v biases)"),
        (moe.shared_experts > 0 and not family.shared_expert, f"moe.shared_experts="
         f"{moe.shared_experts} ({family.model_type} has no shared expert)"),
        (family.shared_expert and moe.shared_experts > 0 and not moe.shared_expert_gate,
         "its shared experts have no gate (moe.shared_expert_gate=false)"),
        (family.shared_expert and moe.shared_experts == 0, f"{family.model_type} always has a "
         "gated shared expert and this model has none"),
        (moe.pre_softmax and not family.norm_topk_key, f"moe.pre_softmax=true ({family.model_type}"
         " renormalises the top-k weights)"),
        (family is MIXTRAL and m.moe_layer_freq != 1, "it has dense layers between MoE layers "
         "(Mixtral has none)"),
    ]
    return "; ".join(text for bad, text in reasons if bad) or None


def export_family(cfg: RunConfig, name: str | None) -> Family:
    """``--family`` (default: the first family that can hold the model)."""
    if name is not None:
        if name not in FAMILIES:
            raise UserError(f"--family {name!r}: not a family moue writes; choose one of "
                            f"{', '.join(FAMILIES)}")
        family = FAMILIES[name]
        why = unsupported_export(cfg, family)
        if why:
            raise UserError(f"--family {name}: this model cannot be written as {name}: {why}")
        return family
    for family in FAMILIES.values():
        if unsupported_export(cfg, family) is None:
            return family
    why = "; ".join(f"{f.model_type}: {unsupported_export(cfg, f)}" for f in FAMILIES.values())
    raise UserError(f"this model fits no Hugging Face family moue writes ({why})")


# --- tensors ---

def _layer_names(family: Family, cfg: RunConfig, i: int) -> list[tuple[str, str]]:
    """(Hugging Face name, moue name) of layer ``i``'s one-to-one tensors."""
    hf, mo = f"model.layers.{i}.", f"decoder.layers.{i}."
    pairs = [(hf + "input_layernorm.weight", mo + "input_layernorm.weight"),
             (hf + "post_attention_layernorm.weight", mo + "pre_mlp_layernorm.weight"),
             (hf + "self_attn.o_proj.weight", mo + "self_attention.linear_proj.weight")]
    if cfg.model.qk_norm:
        pairs += [(hf + f"self_attn.{x}_norm.weight", mo + f"self_attention.{x}_layernorm.weight")
                  for x in "qk"]
    if i in set(cfg.model.moe_layers):
        moe = hf + family.moe_prefix + "."
        pairs.append((moe + "gate.weight", mo + "mlp.router.weight"))
        if cfg.moe.shared_experts:
            pairs += [(moe + "shared_expert_gate.weight", mo + "mlp.shared_experts.gate_weight"),
                      (moe + "shared_expert.down_proj.weight",
                       mo + "mlp.shared_experts.linear_fc2.weight")]
    else:
        pairs.append((hf + "mlp.down_proj.weight", mo + "mlp.linear_fc2.weight"))
    return pairs


def _fc1_pairs(family: Family, cfg: RunConfig, i: int) -> list[tuple[str, str, str]]:
    """(HF gate name, HF up name, moue fc1 name) of layer ``i``'s shared or dense MLP."""
    hf, mo = f"model.layers.{i}.", f"decoder.layers.{i}."
    if i not in set(cfg.model.moe_layers):
        return [(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight", mo + "mlp.linear_fc1.weight")]
    if cfg.moe.shared_experts:
        shared = hf + family.moe_prefix + ".shared_expert."
        return [(shared + "gate_proj.weight", shared + "up_proj.weight",
                 mo + "mlp.shared_experts.linear_fc1.weight")]
    return []


def _qkv_split(cfg: RunConfig) -> tuple[int, list[int]]:
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    d = m.kv_channels
    return groups, [m.num_attention_heads // groups * d, d, d]


def pack_qkv(cfg: RunConfig, q, k, v) -> torch.Tensor:
    """Megatron's ``linear_qkv`` (weight or bias) from separate q, k, v."""
    groups, _ = _qkv_split(cfg)
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def unpack_qkv(cfg: RunConfig, qkv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, sizes = _qkv_split(cfg)
    q, k, v = qkv.reshape(groups, -1, *qkv.shape[1:]).split(sizes, dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def _expert_tensors(tensors, family: Family, layer: int, wanted: list[int]) -> dict[int, tuple]:
    """(gate, up, down) of each of layer ``layer``'s experts ``wanted`` (their indices in the
    layer), stored one by one or fused; only those experts' bytes are read."""
    gate_n, up_n, down_n = family.expert_names
    for prefix in (f"model.layers.{layer}.{family.moe_prefix}.experts.",
                   f"model.layers.{layer}.mlp.experts."):
        if prefix + "gate_up_proj" in tensors.names():
            return {j: (*tensors.get(prefix + "gate_up_proj", j).chunk(2, dim=0),
                        tensors.get(prefix + "down_proj", j)) for j in wanted}
    prefix = f"model.layers.{layer}.{family.moe_prefix}.experts."
    return {j: tuple(tensors.get(f"{prefix}{j}.{name}.weight") for name in (gate_n, up_n, down_n))
            for j in wanted}


def to_moue(tensors, cfg: RunConfig, family: Family, module: torch.nn.Module) -> None:
    """Copy a Hugging Face directory's ``tensors`` into ``module`` (moue's model on this
    process: all of it, or under a launch of several its share of the pool's experts and the
    rest), tensor by tensor: each is read only when this process holds its place, checked
    against the module's shape, converted to its dtype and dropped, so at most one source tensor
    is held beside the model. Every parameter must be given."""
    expected, used, written = one_process_state(module, keep_vars=True), set(), set()

    def put(key, read, *sources):
        """``read()`` (of the Hugging Face tensors ``sources``) into ``key``."""
        used.update(sources)
        value = read()
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise UserError(f"{tensors.directory}: tensor {', '.join(sources)} has shape "
                            f"{list(value.shape)}, but config.json makes it {list(want)} (as "
                            f"moue's {key}); the weights and config.json do not belong together",
                            every_rank=False)  # under torchrun, met by the process reading it
        expected[key].copy_(value)
        written.add(key)

    def one(key, name):
        put(key, lambda: tensors.get(name), name)

    one("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    one("decoder.final_layernorm.weight", "model.norm.weight")
    if not cfg.model.tie_embeddings:
        one("output_layer.weight", "lm_head.weight")
    topology, moe_layers = cfg.topology(), cfg.model.moe_layers
    for i in range(cfg.model.num_layers):
        for hf_name, mo_name in _layer_names(family, cfg, i):
            one(mo_name, hf_name)
        attn = f"model.layers.{i}.self_attn."
        qkv = f"decoder.layers.{i}.self_attention.linear_qkv."
        for kind in ("weight", "bias") if cfg.model.qkv_bias else ("weight",):
            names = [f"{attn}{x}_proj.{kind}" for x in "qkv"]
            put(qkv + kind, lambda n=names: pack_qkv(cfg, *(tensors.get(x) for x in n)), *names)
        for gate, up, fc1 in _fc1_pairs(family, cfg, i):
            put(fc1, lambda g=gate, u=up: torch.cat([tensors.get(g), tensors.get(u)]), gate, up)
        if i in moe_layers:
            eligible = topology.eligible(moe_layers.index(i)).tolist()
            key = POOL_EXPERTS + "{}.linear_fc{}.weight"
            held = [j for j, e in enumerate(eligible)  # another process's experts: not read
                    if key.format(e, 1) in expected]
            experts = _expert_tensors(tensors, family, i, held)
            prefix = f"model.layers.{i}.{family.moe_prefix}.experts."
            used.update(n for n in tensors.names() if n.startswith((prefix, f"model.layers.{i}.mlp.experts.")))
            for j, (gate, up, down) in experts.items():
                put(key.format(eligible[j], 1), lambda g=gate, u=up: torch.cat([g, u]),
                    f"{prefix}{j} (gate, up)")
                put(key.format(eligible[j], 2), lambda d=down: d, f"{prefix}{j} (down)")
    unused = sorted(n for n in tensors.names() - used if not n.endswith("rotary_emb.inv_freq")
                    and not (cfg.model.tie_embeddings and n == "lm_head.weight"))
    if unused:
        raise UserError(f"{tensors.directory}: tensors {unused[:4]}{' ...' if len(unused) > 4 else ''}"
                        f" have no place in a {family.model_type} model of this config.json; "
                        "the weights and config.json do not belong together", every_rank=False)
    unset = sorted(k for k, v in expected.items()
                   if isinstance(v, torch.nn.Parameter) and k not in written)
    if unset:  # a family's tensor moue has no mapping for: a bug, not the user's input
        raise RuntimeError(f"no Hugging Face tensor was mapped to {unset[:3]}")


def to_hf(state: dict, cfg: RunConfig, family: Family,
          held: set[int] | None = None) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of ``state`` (moue's model under one process's names: all of it,
    or the pool experts ``held`` and the rest): each MoE layer's experts are private copies of
    its window's pool experts, in ascending pool order (as its router rows); views of ``state``
    wherever the layouts allow."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    topology, moe_layers = cfg.topology(), cfg.model.moe_layers
    gate_n, up_n, down_n = family.expert_names
    for i in range(cfg.model.num_layers):
        for hf_name, mo_name in _layer_names(family, cfg, i):
            out[hf_name] = state[mo_name]
        attn = f"model.layers.{i}.self_attn."
        qkv = f"decoder.layers.{i}.self_attention.linear_qkv."
        for kind in ("weight", "bias") if cfg.model.qkv_bias else ("weight",):
            for x, part in zip("qkv", unpack_qkv(cfg, state[qkv + kind]), strict=True):
                out[f"{attn}{x}_proj.{kind}"] = part
        for gate, up, fc1 in _fc1_pairs(family, cfg, i):
            out[gate], out[up] = state[fc1].chunk(2, dim=0)
        if i in moe_layers:
            eligible = topology.eligible(moe_layers.index(i)).tolist()
            prefix = f"model.layers.{i}.{family.moe_prefix}.experts."
            for j, pool_id in enumerate(eligible):
                if held is not None and pool_id not in held:  # another process's expert
                    continue
                key = f"decoder.expert_pool.local_experts.{pool_id}.linear_fc"
                gate, up = state[key + "1.weight"].chunk(2, dim=0)
                out[f"{prefix}{j}.{gate_n}.weight"] = gate
                out[f"{prefix}{j}.{up_n}.weight"] = up
                out[f"{prefix}{j}.{down_n}.weight"] = state[key + "2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    # Views of ``state`` (no copies; the q/k/v split alone copies): ``write_tensors`` converts
    # and copies shard by shard, and copies a pool expert shared by several layers.
    return out
