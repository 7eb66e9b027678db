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

Elastic training (``moue.elastic.apply``, the one place that changes these) sets per step the
experts kept (``shared.elastic.keep_E``: the others are masked out like experts outside the
window), the top-k (``config.moe_router_topk``, read by this router's ``topk`` and by Megatron's
dispatchers), and the Elastic MoE options (docs/elastic.md):

- co-activation sampling: with probability ``p`` per sequence position (the same for every
  sample, drawn from the step's seed and the layer, so every layout draws alike), a token takes
  its ``k_ideal`` best experts and keeps ``k`` of them at random; the kept gates are what top-k
  routing would give those experts (renormalised like Megatron's top-k, except pre-softmax);
- router sharpening: ``KL(sg(q) || p)`` per token with ``p`` the routing distribution over the
  window and ``q ~ p^2`` its sharpened copy (target without gradient), averaged over tokens and
  layers, times ``sharpen_coeff``: the router learns a confident ranking beyond its top k.

The state enters through ``state_in`` and leaves through ``state_out``, set by
``moue.model.layer.MoUETransformerLayer`` around the MoE forward. That is safe without recompute and
under full recompute (the layer, state included, is what is recomputed). It would not be safe
under Megatron's selective ``moe`` recompute, which checkpoints only the MoE layer's own inputs:
when recompute options are added, that one must be refused while the state is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
class ElasticRouting:
    """The step's elastic settings that every router reads (set by ``moue.elastic.apply``)."""

    keep_E: torch.Tensor | None = None  # pool experts kept this step; None: all
    coactivation_prob: float = 0.0
    k_ideal: int = 0
    seed: int = 0  # the step's seed of co-activation sampling
    sharpen_coeff: float = 0.0
    # An elastic micro-batch (elastic.granularity=microbatch, moue.elastic.microbatch): per
    # sample b the pool experts kept and per MoE layer l and sample b the top-k; no balance.
    sub_batch: bool = False
    keep_bE: torch.Tensor | None = None  # [b, E] bool; None: all
    # per MoE layer, [(k, the samples routing with k)]; None: the configured k for every sample
    topk_groups: list | None = None


@dataclass
class SharedRouting:
    """What every router of a model shares: the topology, the balance state, U and the step's
    elastic settings."""

    topology: Topology
    balance: Balance
    embedding: UniversalEmbedding | None  # None when router_state_dim == 0
    moe_layer_freq: int
    elastic: ElasticRouting = field(default_factory=ElasticRouting)
    # Progressive widening (moue.model.widening): the own block's size (0: off) and the step's
    # opening of the rest of the window, 0 (closed) .. 1 (open).
    widen_block: int = 0
    widen_scale: float = 1.0


def _biased_topk(logits_TE, bias_E, topk, score_function, pre_softmax, scaling_factor):
    """Top-k of score + bias (the selection bias of ``moue.model.balance``); the gates are what
    Megatron's ``topk_routing_with_score_function`` gives the chosen experts, so that a zero
    bias routes exactly as Megatron does."""
    if score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    else:
        scores_TE = torch.sigmoid(logits_TE.float())
    # Experts outside the window (and dropped ones) stay out whatever their bias.
    biased_TE = (scores_TE + bias_E).masked_fill(logits_TE <= MASKED / 2, float("-inf"))
    top_TK = torch.topk(biased_TE, k=topk, dim=-1).indices
    if score_function == "softmax" and not pre_softmax:  # softmax over the chosen logits
        gates_TK = torch.softmax(logits_TE.gather(1, top_TK), dim=-1, dtype=torch.float32)
    else:
        gates_TK = scores_TE.gather(1, top_TK)
        if score_function == "sigmoid" and topk > 1:
            gates_TK = gates_TK / (gates_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        gates_TK = gates_TK * scaling_factor
    probs_TE = torch.zeros_like(logits_TE).scatter(1, top_TK, gates_TK.type_as(logits_TE))
    return probs_TE, torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, top_TK, True)


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
        self.register_buffer("foreign_W", torch.zeros(topology.window, dtype=torch.bool),
                             persistent=False)  # widening: window experts outside the own block
        self.state_in: torch.Tensor | None = None
        self.state_out: torch.Tensor | None = None

    @property
    def topk(self) -> int:
        """The step's top-k: the shared config's, which Megatron's dispatchers read too."""
        return self.config.moe_router_topk

    @topk.setter
    def topk(self, k: int):
        if k != self.config.moe_router_topk:  # Megatron's __init__ sets it to the config's
            raise AttributeError("the top-k is set through moue.elastic.apply, for every router "
                                 "and dispatcher at once")

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        layer_index = layer_number - 1
        if layer_index % self.shared.moe_layer_freq:
            raise ValueError(f"layer {layer_number} is not an MoE layer under moe_layer_freq="
                             f"{self.shared.moe_layer_freq}")
        self.moe_index = layer_index // self.shared.moe_layer_freq
        self.eligible_W.copy_(self.shared.topology.eligible(self.moe_index))
        block = self.shared.widen_block
        if block:
            self.foreign_W.copy_(self.eligible_W // block != self.moe_index)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits over the pool [s, b, E]; only this layer's window (and kept experts) finite."""
        logits_sbW = router_gating_linear(input, self.weight, None, torch.float32)
        scale = self.shared.widen_scale if self.shared.widen_block else 1.0
        if self.state_dim:
            if self.state_in is None:
                raise RuntimeError("UniversalRouter: the trajectory state was not set; the router "
                                   "runs inside moue.model.layer.MoUETransformerLayer")
            u_WD = self.shared.embedding.weight[self.eligible_W].float()
            logits_sbW = logits_sbW + scale * (self.state_in.float() @ u_WD.t())
        if scale < 1.0:  # widening: the foreign experts' scores x scale (closed at 0)
            offset = math.log(scale) if scale > 0 else MASKED
            logits_sbW = logits_sbW + offset * self.foreign_W.to(logits_sbW.dtype)
        logits_sbE = logits_sbW.new_full((*logits_sbW.shape[:-1], self.shared.topology.num_experts),
                                         MASKED)
        logits_sbE = logits_sbE.index_copy(-1, self.eligible_W, logits_sbW)
        keep_E, keep_bE = self.shared.elastic.keep_E, self.shared.elastic.keep_bE
        if keep_E is not None:
            logits_sbE = logits_sbE.masked_fill(~keep_E, MASKED)
        if keep_bE is not None:  # per sample: logits are [s, b, E]
            logits_sbE = logits_sbE.masked_fill(~keep_bE, MASKED)
        return logits_sbE

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """Top-k within the window, the pool's balance loss, the state update, Megatron order."""
        if padding_mask is not None:
            raise NotImplementedError("UniversalRouter: padding masks are not supported yet")
        s, b, num_experts = logits.shape
        logits_TE = self.apply_z_loss(logits.view(-1, num_experts))
        balance = self.shared.balance
        elastic = self.shared.elastic
        if elastic.topk_groups is not None:
            probs_TE, map_TE = self._select_per_sample(
                logits_TE, elastic.topk_groups[self.moe_index], s, b)
        else:
            probs_TE, map_TE = self._select(logits_TE, self.topk)
        # Routing itself depends on self.training alone: under full recompute the first pass
        # runs without grad and must route as the recomputed one does.
        if self.training and elastic.coactivation_prob > 0 and not elastic.sub_batch:
            probs_TE, map_TE = self._coactivate(logits_TE, probs_TE, map_TE, s, b)
        if self.training and torch.is_grad_enabled():
            # Counted once per forward: under full recompute the first pass runs without grad.
            if not elastic.sub_batch:  # elastic micro-batches leave the balance alone
                probs_TE = self._attach_balance_loss(logits_TE, probs_TE, map_TE)
            else:
                self._record_no_balance_loss(logits_TE)
            if elastic.sharpen_coeff:
                probs_TE = self._attach_sharpening_loss(logits_TE, probs_TE)
            with torch.no_grad():
                if not elastic.sub_batch:
                    balance.count(self.moe_index, map_TE)
                self._record_entropy(logits_TE)
        if self.state_dim:
            moved_sbD = (probs_TE.float() @ self.shared.embedding.weight.float()).view(s, b, -1)
            self.state_out = torch.nn.functional.rms_norm(
                self.state_in.float() + moved_sbD, (self.state_dim,)).type_as(self.state_in)
        order = self.megatron_to_pool
        return probs_TE[:, order], map_TE[:, order]

    def _select(self, logits_TE, topk):
        """Top-k gates and routing map [T, E] (Megatron's, or aux_free's biased selection)."""
        bias_E = self.shared.balance.selection_bias(self.moe_index)
        if bias_E is not None:
            return _biased_topk(logits_TE, bias_E, topk, self.score_function,
                                self.config.moe_router_pre_softmax,
                                self.config.moe_router_topk_scaling_factor)
        return topk_routing_with_score_function(
            logits_TE, topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function)

    def _select_per_sample(self, logits_TE, groups, s, b):
        """``_select`` with a top-k per sample: each token's gates and map are those of top-k
        routing with its sample's k. ``groups``: [(k, samples [n] on the device)]; tokens are
        [s, b] flattened, so sample j's tokens are rows j, b + j, 2b + j, ... (no host sync)."""
        probs_TE = torch.zeros_like(logits_TE)
        map_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
        positions = torch.arange(s, device=logits_TE.device)[:, None] * b
        for k, samples_n in groups:
            rows_R = (positions + samples_n[None, :]).reshape(-1)
            probs_RE, map_RE = self._select(logits_TE[rows_R], k)
            probs_TE = probs_TE.index_copy(0, rows_R, probs_RE.type_as(probs_TE))
            map_TE = map_TE.index_copy(0, rows_R, map_RE)
        return probs_TE, map_TE

    def _coactivate(self, logits_TE, probs_TE, map_TE, s, b):
        """Co-activation sampling (module docstring): sampled positions keep a random k of their
        k_ideal best experts. Draws depend on the step, the layer and the global sequence
        position only (under sequence parallelism this rank holds positions offset..offset+s)."""
        elastic, k = self.shared.elastic, self.topk
        ideal_probs_TE, ideal_map_TE = self._select(logits_TE, elastic.k_ideal)
        seq = s * self.tp_cp_group.size() if self.config.sequence_parallel else s
        offset = s * self.tp_cp_group.rank() if self.config.sequence_parallel else 0
        gen = torch.Generator().manual_seed(elastic.seed + 7919 * self.moe_index)
        sampled_S = (torch.rand(seq, generator=gen) < elastic.coactivation_prob)[offset:offset + s]
        keys_SE = torch.rand(seq, logits_TE.shape[1], generator=gen)[offset:offset + s]
        device = logits_TE.device
        sampled_T = sampled_S.to(device).repeat_interleave(b)  # tokens are [s, b] flattened
        keys_TE = keys_SE.to(device).repeat_interleave(b, dim=0).masked_fill(~ideal_map_TE, -1.0)
        kept_TE = torch.zeros_like(ideal_map_TE).scatter(1, keys_TE.topk(k, dim=-1).indices, True)
        gates_TE = ideal_probs_TE * kept_TE
        if not self.config.moe_router_pre_softmax:
            total_T = ideal_probs_TE.sum(dim=-1, keepdim=True)
            gates_TE = gates_TE / gates_TE.sum(dim=-1, keepdim=True).clamp(min=1e-20) * total_T
        rows_T1 = sampled_T[:, None]
        return torch.where(rows_T1, gates_TE, probs_TE), torch.where(rows_T1, kept_TE, map_TE)

    def _attach_sharpening_loss(self, logits_TE, probs_TE):
        """Router sharpening (module docstring), through Megatron's aux-loss attachment."""
        log_p_TE = torch.log_softmax(logits_TE.float(), dim=-1)
        log_q_TE = torch.log_softmax(2.0 * logits_TE.float(), dim=-1).detach()
        kl_sum = (log_q_TE.exp() * (log_q_TE - log_p_TE)).sum()
        tokens = logits_TE.shape[0] * self.tp_cp_group.size()
        loss = kl_sum / (tokens * self.shared.balance.active_layers)
        coeff = self.shared.elastic.sharpen_coeff
        return self.attach_and_log_load_balancing_loss(
            probs_TE, coeff, coeff * loss, "router_sharpen_loss", self.tp_cp_group,
            valid_token_count=logits_TE.shape[0])

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

    def _record_no_balance_loss(self, logits_TE):
        """An elastic micro-batch adds no balance loss, but records zero under each name a
        full-model one records: Megatron's tracker creates names when first recorded and reduces
        each over the ranks, so every rank must hold the same names (a data-parallel rank with
        only elastic micro-batches would otherwise fall out of step in the reductions)."""
        balance = self.shared.balance
        names = (["balance_loss"] if balance.coeff and type(balance).layer_loss
                 is not Balance.layer_loss else []) + (
            ["ep_balance_loss"] if balance.ep_coeff and balance.ep_groups > 1 else [])
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        for name in names:
            save_to_aux_losses_tracker(name, logits_TE.new_zeros(()), self.layer_number,
                                       num_layers, reduce_group=self.tp_cp_group)

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
