"""The universal router: Megatron-Core's TopKRouter scoring one layer's window of the pool.

Shapes: ``s`` sequence (a shard of it under sequence parallelism), ``b`` batch, ``T = s*b``
tokens, ``h`` hidden, ``E`` pool experts, ``W`` window, ``d`` trajectory-state dimension.

Per MoE layer ``l`` (docs/concepts.md)::

    z_l = W_l x_l + U[S_l] r_l          logits outside S_l are -inf (a large negative number)
    r_{l+1} = rmsnorm(r_l + sum_{e in top-k} g_e U[e])

``W_l`` [W, h] is this layer's own weight, ``U`` [E, d] the universal expert-embedding table
shared by all layers, ``r`` [s, b, d] the token's trajectory state (``r_0 = 0``). Score function,
pre-/post-softmax top-k, z-loss and top-k scaling are Megatron's. The balance loss is the pool's
(``moue.model.balance``), not Megatron's per-layer aux loss (which would normalise by E, not W).

Per step, elastic training may set ``expert_mask_E`` (experts kept; None = all) and the top-k
(``moue.model.builder.set_topk``, which also resizes Megatron's dispatchers).

The state enters through ``state_in`` and leaves through ``state_out``, set by
``moue.model.layer.MoUETransformerLayer`` around the MoE forward. That is safe without recompute and
under full recompute (the layer, state included, is what is recomputed). It would not be safe
under Megatron's selective ``moe`` recompute, which checkpoints only the MoE layer's own inputs:
when recompute options are added, that one must be refused while the state is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
    save_to_aux_losses_tracker,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from moue.model.balance import Balance
from moue.model.pool import UniversalEmbedding, megatron_to_pool
from moue.model.topology import Topology

MASKED = -1.0e9  # behaves as -inf in fp32 softmax/sigmoid without producing NaNs


@dataclass
class SharedRouting:
    """What every router of a model shares: the topology, the balance state and U."""

    topology: Topology
    balance: Balance
    embedding: UniversalEmbedding | None  # None when router_state_dim == 0
    moe_layer_freq: int


def _biased_topk(logits_TE, bias_E, topk, score_function):
    """Aux-free selection: top-k of score + bias; gates are the unbiased scores, renormalised."""
    if score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    else:
        scores_TE = torch.sigmoid(logits_TE.float())
    top_TK = torch.topk(scores_TE + bias_E, k=topk, dim=-1).indices
    routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, top_TK, True)
    gates_TE = scores_TE * routing_map_TE
    return (gates_TE / gates_TE.sum(dim=-1, keepdim=True)).type_as(logits_TE), routing_map_TE


class UniversalRouter(TopKRouter):
    """Routes a layer's tokens within its window of the universal pool (see module docstring)."""

    def __init__(self, config, pg_collection=None, *, shared: SharedRouting, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self.shared = shared  # plain attribute: its modules are registered once, on the decoder
        topology = shared.topology
        self.state_dim = 0 if shared.embedding is None else shared.embedding.weight.shape[1]
        # Megatron built a [E, h] weight; this router scores only its window: [W, h].
        self.weight = torch.nn.Parameter(
            torch.empty(topology.window, config.hidden_size, dtype=torch.float32))
        self.reset_parameters()
        ep = pg_collection.ep.size()
        self.register_buffer("megatron_to_pool", megatron_to_pool(topology.num_experts, ep),
                             persistent=False)
        self.register_buffer("eligible_W", torch.zeros(topology.window, dtype=torch.long),
                             persistent=False)
        self.expert_mask_E: torch.Tensor | None = None
        self.state_in: torch.Tensor | None = None
        self.state_out: torch.Tensor | None = None

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        layer_index = layer_number - 1
        if layer_index % self.shared.moe_layer_freq:
            raise ValueError(f"layer {layer_number} is not an MoE layer under moe_layer_freq="
                             f"{self.shared.moe_layer_freq}")
        self.moe_index = layer_index // self.shared.moe_layer_freq
        self.eligible_W.copy_(self.shared.topology.eligible(self.moe_index))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits over the pool [s, b, E]; only this layer's window (and kept experts) finite."""
        logits_sbW = router_gating_linear(input, self.weight, None, torch.float32)
        if self.state_dim:
            if self.state_in is None:
                raise RuntimeError("UniversalRouter: the trajectory state was not set; the router "
                                   "runs inside moue.model.layer.MoUETransformerLayer")
            u_WD = self.shared.embedding.weight[self.eligible_W].float()
            logits_sbW = logits_sbW + self.state_in.float() @ u_WD.t()
        logits_sbE = logits_sbW.new_full((*logits_sbW.shape[:-1], self.shared.topology.num_experts),
                                         MASKED)
        logits_sbE = logits_sbE.index_copy(-1, self.eligible_W, logits_sbW)
        if self.expert_mask_E is not None:
            logits_sbE = logits_sbE.masked_fill(~self.expert_mask_E, MASKED)
        return logits_sbE

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """Top-k within the window, the pool's balance loss, the state update, Megatron order."""
        if padding_mask is not None:
            raise NotImplementedError("UniversalRouter: padding masks are not supported yet")
        s, b, num_experts = logits.shape
        logits_TE = self.apply_z_loss(logits.view(-1, num_experts))
        balance = self.shared.balance
        bias_E = balance.selection_bias()
        if bias_E is None:
            probs_TE, map_TE = topk_routing_with_score_function(
                logits_TE, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
                score_function=self.score_function)
        else:
            probs_TE, map_TE = _biased_topk(logits_TE, bias_E, self.topk, self.score_function)
        if self.training and torch.is_grad_enabled():
            # Counted once per forward: under full recompute the first pass runs without grad.
            probs_TE = self._attach_balance_loss(logits_TE, probs_TE, map_TE)
            with torch.no_grad():
                balance.count(self.moe_index, map_TE)
                self._record_entropy(logits_TE)
        if self.state_dim:
            moved_sbD = (probs_TE.float() @ self.shared.embedding.weight.float()).view(s, b, -1)
            self.state_out = torch.nn.functional.rms_norm(
                self.state_in.float() + moved_sbD, (self.state_dim,)).type_as(self.state_in)
        order = self.megatron_to_pool
        return probs_TE[:, order], map_TE[:, order]

    def _record_entropy(self, logits_TE):
        """Mean entropy of the routing distribution over the window / log(W), in Megatron's
        aux-loss tracker ("router_entropy"; 1 = uniform, 0 = one expert takes everything)."""
        p_TE = torch.softmax(logits_TE.float(), dim=-1)
        entropy = -(p_TE * torch.log(p_TE.clamp(min=1e-30))).sum(-1).mean()
        normalised = entropy / math.log(self.shared.topology.window)
        num_layers = self.config.num_layers
        # The tracker sums over the sequence-parallel group: record this shard's share.
        save_to_aux_losses_tracker("router_entropy", normalised / self.tp_cp_group.size(),
                                   self.layer_number, num_layers, reduce_group=self.tp_cp_group)

    def _attach_balance_loss(self, logits_TE, probs_TE, map_TE):
        """The pool's balance loss and the expert-parallel one (``moue.model.balance``)."""
        balance = self.shared.balance
        main = balance.coeff and type(balance).layer_loss is not Balance.layer_loss
        if not main and not balance.ep_coeff:
            return probs_TE
        _, scores_TE = compute_routing_scores_for_aux_loss(logits_TE, self.topk, self.score_function)
        tokens_per_expert_E = None
        if balance.name == "per_layer" or balance.ep_coeff:
            tokens_per_expert_E, _, _ = get_tokens_per_expert_and_token_count(
                map_TE, reduce_group=self.tp_cp_group, topk=self.topk)
        tokens = logits_TE.shape[0] * self.tp_cp_group.size()
        probs_sum_E = scores_TE.sum(dim=0)
        for name, coeff, loss in (
                ("balance_loss", balance.coeff,
                 balance.layer_loss(probs_sum_E, tokens, tokens_per_expert_E) if main else None),
                ("ep_balance_loss", balance.ep_coeff,
                 balance.ep_layer_loss(probs_sum_E, tokens, tokens_per_expert_E))):
            if loss is not None:
                probs_TE = self.attach_and_log_load_balancing_loss(
                    probs_TE, coeff, coeff * loss, name, self.tp_cp_group,
                    valid_token_count=logits_TE.shape[0])
        return probs_TE
