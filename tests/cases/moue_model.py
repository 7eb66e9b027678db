"""Cases: the MoUE model under every parallel layout (see test_moue_model.py)."""

from functools import partial

import torch
from megatron.core import parallel_state

from moue.elastic.apply import apply_submodel
from moue.elastic.submodel import SubModel
from tests.distributed import Cases
from tests.equivalence import (
    LAYOUTS,
    STANDARD,
    OnRandomTokens,
    build,
    fill_by_global_key,
    layout_for,
    random_batch,
    tiny,
    train,
)

CASES = Cases()


def _pool_replicas_identical(model) -> bool | None:
    """Whether every pipeline stage holds bit-identical pool and U values (None with pp=1)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if group.size() == 1:
        return None
    decoder = model.module.decoder
    flat = torch.cat([p.detach().flatten() for p in (*decoder.expert_pool.parameters(),
                                                     *decoder.expert_embedding.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(group.size())]
    torch.distributed.all_gather(gathered, flat, group=group)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


# lr 3e-3: at 1e-2 two Adam steps on this tiny model amplify float reordering under TP (SP
# reductions) to ~1e-5 in the grad norm (measured: 1.2e-5 at 1e-2, 3.5e-7 at 3e-3, 3e-8 at 1e-3).
LR = ("train.lr=3e-3", "train.min_lr=3e-3")


def _train(layout: str, world_size: int, *overrides: str) -> dict:
    run = train(tiny(*LR, *overrides), layout_for(layout, world_size))
    return {"losses": run["losses"], "grad_norms": run["grad_norms"],
            "balance_loss": run["balance_loss"],
            "replicas_identical": _pool_replicas_identical(run["model"])}


CASES.add("moue_train[single]", partial(_train, "single", 1), nproc=1)
for _name in LAYOUTS:
    CASES.add(f"moue_train[{_name}]", partial(_train, _name, 2), nproc=2)

# Aux-free balance (selection bias from the pool's loads), a shared expert, sigmoid scores, and
# the balance over 2 expert-parallel groups, by the loss and by the selection bias per layer and
# group (groups fixed, so every layout has the same loss; rates large enough to change choices).
VARIANT = ("moe.balance=aux_free", "moe.aux_free_rate=0.05", "moe.shared_experts=1",
           "moe.score_function=sigmoid", "moe.ep_balance_coeff=0.05", "moe.ep_balance_groups=2",
           "moe.ep_balance_rate=0.03")


# The architecture options of released checkpoints (Qwen2/Qwen3-MoE style), all on together.
OPTIONS = ("model.qk_norm=true", "model.qkv_bias=true", "model.tie_embeddings=true",
           "model.rope_base=1000000", "model.norm_epsilon=1e-6", "model.activation=swiglu",
           "model.num_query_groups=2", "moe.shared_experts=1", "moe.shared_expert_gate=true",
           "moe.pre_softmax=true", "model.head_dim=12")

for _name in ("single", *LAYOUTS):
    CASES.add(f"moue_options[{_name}]", partial(_train, _name, 1 if _name == "single" else 2,
                                                *OPTIONS), nproc=1 if _name == "single" else 2)


def _options_reach_the_modules() -> dict:
    """Where each option lands in the built model (one process)."""
    lay = layout_for("single", 1)
    model = build(tiny(*OPTIONS), lay)
    attention = model.decoder.layers[0].self_attention
    return {"inv_freq_1": model.rotary_pos_emb.inv_freq[1].item(),
            "head_dim": model.config.kv_channels,
            "hidden": model.config.hidden_size,
            "final_norm_eps": model.decoder.final_layernorm.eps,
            "q_norm_size": attention.q_layernorm.weight.numel(),
            "qkv_bias": attention.linear_qkv.bias is not None,
            "output_weight_is_embedding": model.shared_embedding_or_output_weight()
            is model.embedding.word_embeddings.weight and model.output_layer.weight is None,
            "shared_gate": tuple(model.decoder.layers[0].mlp.shared_experts.gate_weight.shape)}


CASES.add("options_reach_the_modules", _options_reach_the_modules, nproc=1)


def _train_variant(layout: str, world_size: int) -> dict:
    run = train(tiny(*LR, *VARIANT), layout_for(layout, world_size))
    balance = run["model"].module.decoder.pool_balance
    return {"losses": run["losses"], "grad_norms": run["grad_norms"],
            "bias": balance.bias_E.tolist(), "ep_bias": balance.bias_LE.tolist(),
            "ep_balance_loss": run["ep_balance_loss"]}


CASES.add("moue_variant[single]", partial(_train_variant, "single", 1), nproc=1)
for _name in ("ep2", "pp2"):
    CASES.add(f"moue_variant[{_name}]", partial(_train_variant, _name, 2), nproc=2)


# --- The standard topology is exactly Megatron-Core's MoE -----------------------------------

L, N = 4, 4  # layers, experts per layer: the MoUE pool has E = L*N = 16


def _one_step(model, cfg):
    """Logits of a fixed batch and the gradients of one backward (CE loss + balance loss)."""
    tokens = random_batch(cfg, 0)[:2]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    logits = model(inputs, positions, attention_mask=None)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach()


def _expert_grads(experts_by_pool_id, ep_group):
    """{'fc1'/'fc2': [E, ...] global gradients}, gathered over the expert-parallel group."""
    out = {}
    for name in ("linear_fc1", "linear_fc2"):
        some = next(iter(experts_by_pool_id.values()))
        full = torch.zeros(L * N, *getattr(some, name).weight.shape)
        for pool_id, expert in experts_by_pool_id.items():
            full[pool_id] = getattr(expert, name).weight.grad
        torch.distributed.all_reduce(full, group=ep_group)
        out[name] = full
    return out


def _standard_vs_megatron(layout: str, world_size: int, swiglu: bool = False) -> dict:
    lay = layout_for(layout, world_size)
    fc1 = 128 if swiglu else 64  # SwiGLU's fc1 holds gate and up
    # One config for both: Megatron's aux loss per layer at coeff / L is moue's per_layer balance.
    cfg = tiny(*STANDARD, f"model.activation={'swiglu' if swiglu else 'gelu'}")
    meg = build(cfg, lay, megatron=True)
    fill_by_global_key(meg, 3)
    ours = build(cfg, lay)
    aliases = {f"decoder.expert_pool.experts.{n}.weight":
               (f"decoder.layers.mlp.experts.experts.{n}.weight", (L, N, *s))
               for n, s in (("linear_fc1", (fc1, 32)), ("linear_fc2", (32, 64)))}
    fill_by_global_key(ours, 3, aliases)
    meg_logits, our_logits = _one_step(meg, cfg), _one_step(ours, cfg)

    ep_group = parallel_state.get_expert_model_parallel_group()
    ep_rank, n_local = ep_group.rank(), N // ep_group.size()
    meg_experts = {l * N + ep_rank * n_local + j: e
                   for l, layer in enumerate(meg.decoder.layers)
                   for j, e in enumerate(layer.mlp.experts.local_experts)}
    pool = ours.decoder.expert_pool
    our_experts = dict(zip(pool.pool_ids(), pool.local_experts, strict=True))
    meg_g, our_g = _expert_grads(meg_experts, ep_group), _expert_grads(our_experts, ep_group)
    dense = {n: p.grad for n, p in meg.named_parameters() if "experts" not in n}
    return {
        "logits": (our_logits - meg_logits).abs().max().item(),
        "logits_scale": meg_logits.abs().max().item(),
        "dense_grads": max((p.grad - dense[n]).abs().max().item()
                           for n, p in ours.named_parameters() if n in dense),
        "dense_params_compared": sum(n in dense for n, _ in ours.named_parameters()),
        "expert_grads": max((our_g[k] - meg_g[k]).abs().max().item() for k in our_g),
        "grad_scale": max(g.abs().max().item() for g in meg_g.values()),
        "placement": pool.pool_ids(),
    }


CASES.add("standard_vs_megatron[single]", partial(_standard_vs_megatron, "single", 1), nproc=1)
CASES.add("standard_vs_megatron[ep2]", partial(_standard_vs_megatron, "ep2", 2), nproc=2)
CASES.add("standard_vs_megatron[swiglu_ep2]", partial(_standard_vs_megatron, "ep2", 2, True),
          nproc=2)


# --- The shared pool and the trajectory state -------------------------------------------------


class _PrivateCopy(torch.nn.Module):
    """Stands in for the pool in one layer, with that layer's own copy of its parameters."""

    def __init__(self, pool):
        super().__init__()
        object.__setattr__(self, "pool", pool)  # not registered: the copy holds no parameters
        self.params = {n: p.detach().clone().requires_grad_() for n, p in pool.named_parameters()}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.pool, self.params, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.pool, name)


def _one_process_model(*overrides: str):
    """The tiny model in one process, and its config."""
    cfg = tiny(*overrides)
    return build(cfg, layout_for("single", 1)), cfg


def _pool_grad_is_sum_of_layer_grads() -> dict:
    model, cfg = _one_process_model("moe.router_state_dim=0", "moe.balance=none")
    pool = model.decoder.expert_pool
    _one_step(model, cfg)
    shared = {n: p.grad.clone() for n, p in pool.named_parameters()}
    model.zero_grad()
    copies = []
    for layer in model.decoder.layers:
        copies.append(_PrivateCopy(pool))
        layer.mlp.__dict__["experts"] = copies[-1]
    _one_step(model, cfg)
    # A copy's experts outside its layer's window get no tokens, so no gradient (None).
    grad = lambda c, n: 0 if c.params[n].grad is None else c.params[n].grad  # noqa: E731
    summed = {n: sum(grad(c, n) for c in copies) for n in shared}
    # Layers whose private copy of expert e got a gradient: e's exposure (2 for w=4, s=2).
    reached = [sum(bool(torch.as_tensor(grad(c, f"local_experts.{e}.linear_fc1.weight")).any())
                   for c in copies) for e in range(pool.num_local_experts)]
    return {"max_diff": max((summed[n] - shared[n]).abs().max().item() for n in shared),
            "scale": max(g.abs().max().item() for g in shared.values()),
            "layers_reaching_expert": reached,
            "exposure": tiny().topology().exposure_E.tolist()}


def _router_logits(model, cfg) -> list:
    """Logits of every MoE layer's router for a fixed batch, and each layer's routing map."""
    captured = []
    for layer in model.decoder.layers:
        router = layer.mlp.router
        original = router.gating

        def gating(x, _original=original):
            captured.append(_original(x).detach())
            return captured[-1]

        router.gating = gating
    with torch.no_grad():
        _one_step_no_grad(model, cfg)
    for layer in model.decoder.layers:
        del layer.mlp.router.gating
    return captured


def _one_step_no_grad(model, cfg):
    tokens = random_batch(cfg, 0)[:2, :-1]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, attention_mask=None)


def _state_off_equals_zero_state() -> dict:
    stateless, cfg = _one_process_model("moe.router_state_dim=0")
    stateful, _ = _one_process_model("moe.router_state_dim=8")
    stateful.decoder.expert_embedding.weight.data.zero_()
    a, b = _one_step(stateless, cfg), _one_step(stateful, cfg)
    grads_a = dict(stateless.named_parameters())
    same_grads = all(torch.equal(p.grad, grads_a[n].grad)
                     for n, p in stateful.named_parameters() if n in grads_a)
    return {"logits_equal": torch.equal(a, b), "grads_equal": same_grads}


def _state_carries_earlier_choices(state_dim: int) -> dict:
    """Zero every expert's output (so hidden states ignore routing), change layer 0's routing:
    does layer 1's router see it?"""
    model, cfg = _one_process_model(f"moe.router_state_dim={state_dim}")
    for expert in model.decoder.expert_pool.local_experts:
        expert.linear_fc2.weight.data.zero_()
    before = _router_logits(model, cfg)
    model.decoder.layers[0].mlp.router.weight.data.mul_(-1.0)
    after = _router_logits(model, cfg)
    choices = lambda logits: logits.view(-1, logits.shape[-1]).topk(2).indices.sort().values  # noqa: E731
    return {"layer0_choices_changed": not torch.equal(choices(before[0]), choices(after[0])),
            "layer1_logits_changed": not torch.equal(before[1], after[1])}


CASES.add("pool_grad_sum", _pool_grad_is_sum_of_layer_grads, nproc=1)
CASES.add("state_off_equals_zero_state", _state_off_equals_zero_state, nproc=1)
CASES.add("state_carries_choices[d8]", partial(_state_carries_earlier_choices, 8), nproc=1)
CASES.add("state_carries_choices[d0]", partial(_state_carries_earlier_choices, 0), nproc=1)


# --- The dry run's parameter count is the built model's ---------------------------------------

DRY_RUN_CONFIGS = {
    "rotational_state": (),
    "standard_no_state": ("moe.topology=standard", "moe.router_state_dim=0"),
    "dense_between_shared_gqa_layernorm": (
        "model.moe_layer_freq=2", "moe.shared_experts=1", "model.num_query_groups=2",
        "model.normalization=LayerNorm", "moe.topology=full"),
    "dense_baseline": ("model.moe_layer_freq=0", "model.ffn_hidden_size=96"),
    "swiglu_shared_dense_between": ("model.activation=swiglu", "model.moe_layer_freq=2",
                                    "moe.shared_experts=1"),
    "swiglu_grouped_pool": ("model.activation=swiglu", "moe.expert_impl=grouped"),
    "swiglu_dense_baseline": ("model.activation=swiglu", "model.moe_layer_freq=0"),
    "released_options": OPTIONS,
    "released_options_layernorm_dense": (*OPTIONS, "model.normalization=LayerNorm",
                                         "model.moe_layer_freq=2"),
}


def _built_param_count(name: str) -> dict:
    from moue.dry_run import report

    cfg = tiny(*DRY_RUN_CONFIGS[name])
    lay = layout_for("single", 1)
    model = build(cfg, lay)
    return {"built": sum(p.numel() for p in model.parameters()),
            "dry_run": report(cfg, world_size=1)["params_total"]}


for _name in DRY_RUN_CONFIGS:
    CASES.add(f"param_count[{_name}]", partial(_built_param_count, _name), nproc=1)


# --- Per-step hooks for elastic training ------------------------------------------------------


def _elastic_hooks() -> dict:
    """Experts 0 and 5 masked out, top-1, layer 2 skipped: what the pool's counts show."""
    model, cfg = _one_process_model()
    balance = model.decoder.pool_balance
    apply_submodel(model, SubModel(layers=(0, 1, 3), experts=(1, 2, 3, 4, 6, 7), topk=1))
    balance.counts_LE.zero_()
    _one_step(model, cfg)
    counts = balance.counts_E.clone()
    return {"counts": counts.tolist(), "total": counts.sum().item()}


CASES.add("elastic_hooks", _elastic_hooks, nproc=1)


# A fixed reduced sub-model (a layer skipped, half the pool, top-1) under parallel layouts: the
# top-k set once on the config reaches Megatron's dispatchers of either megatron-core version.
SUB = SubModel(layers=(0, 1, 3), experts=(0, 1, 4, 5), topk=1)


class _FixedSubModel(OnRandomTokens):
    """Trains ``SUB`` at every step: put onto the chunk as it is built."""

    def build_module(self, megatron_config):
        module = super().build_module(megatron_config)
        apply_submodel(module, SUB)
        return module


def _train_submodel(layout: str, world_size: int) -> dict:
    run = train(tiny(*LR), layout_for(layout, world_size), trainer=_FixedSubModel)
    return {"losses": run["losses"], "grad_norms": run["grad_norms"],
            "balance_loss": run["balance_loss"]}


CASES.add("moue_submodel[single]", partial(_train_submodel, "single", 1), nproc=1)
for _name in ("ep2", "pp2", "tp2_ep2"):
    CASES.add(f"moue_submodel[{_name}]", partial(_train_submodel, _name, 2), nproc=2)
