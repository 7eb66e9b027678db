"""Load balance over the universal pool: ``uelb``, ``per_layer``, ``aux_free``, ``none``.

Shapes: ``L`` MoE layers, ``E`` pool experts, ``T`` tokens. ``f_LE`` fraction of a layer's
assignments per expert, ``P_LE`` mean router probability, ``q_LE = 1/|S_l|`` on the window and
``Q_E = mean_l q_LE`` (an expert's share under uniform routing in every window: its exposure,
normalised).

UELB (universal expert load balance)::

    F_E = mean_l f_LE,   Pbar_E = mean_l P_LE,   L_uelb = sum_e F_e * Pbar_e / Q_e

It is 1 under uniform routing and, for the block-diagonal (standard) mask, the mean over layers
of the Switch/GShard loss. Only ``Pbar`` carries gradient. ``F`` is taken from the *previous*
optimizer step - one vector of E counts summed over every MoE layer, micro-batch, pipeline stage
and data-parallel rank (``parallel.pool_sync`` sums it; ``F = Q`` at step 0) - so every layer's
term is known locally and the loss is identical under every parallel layout. Per layer the loss is
linear in ``P_l``: ``(1/L) sum_e (F_e/Q_e) P_le``.

Expert-parallel balance (``moe.ep_balance_coeff``): UELB balances the pool as a whole, but a
layer's tokens can still crowd onto the experts of one EP rank inside its window, and the busiest
rank sets that layer's all-to-all and expert time. Pool expert ``e`` sits on EP rank
``e mod EP`` (``moue.model.pool``), so with ``G`` groups (the EP degree) each layer adds the
Switch loss over its groups::

    L_ep,l = G * sum_g f_lg * P_lg      f_lg, P_lg: layer l's assignments / probability on group g

averaged over layers (1 when a layer spreads evenly over the groups). Like ``per_layer`` it uses
the micro-batch's own counts (over the sequence-parallel group), so it is the same under every
layout for a fixed ``G``.

Expert-parallel selection bias (``moe.ep_balance_rate``): the Switch loss reaches the choice only
through the router's probabilities, and where those are near-uniform over the window the counts
follow near-ties (docs/benchmarks.md). This corrects the choice itself, as DeepSeek-V3's
auxiliary-loss-free balance does per expert, but per MoE layer and rank group: after each step
``b_lg += rate * sign(n_l * s_lg - n_lg)``, with ``n_lg`` layer l's assignments on group g (summed
over every rank), ``n_l`` the layer's total and ``s_lg`` the group's share of the layer's
eligible experts. The bias is kept per layer and expert (``bias_LE``, every expert of a group
moved alike) so that its shape does not depend on ``G``, and it is added to the scores for the
top-k selection only, like aux_free's. It depends only on the step's summed counts, so it is the
same under every layout for a fixed ``G``.

Under an elastic sub-model (``set_eligibility``) the step's effective eligibility is the topology
mask without the skipped layers' rows and the dropped experts' columns. Its share ``Q'`` and its
number of MoE layers ``L'`` replace ``Q`` and ``L`` for that step (``per_layer`` uses the kept
window ``W'``). The loads a sub-model step leaves are stored as ``F_e / Q'_e * Q_e`` (an expert
that step could not reach keeps ``Q_e``), so that the next step's weight ``F_e / Q_e`` is the
expert's load relative to its share under the eligibility it was measured with (1 = balanced).
``aux_free`` nudges the bias toward ``Q'`` (an unreachable expert's bias does not move).

This module does no communication: routers hand it token-summed statistics.
"""

from __future__ import annotations

import torch

from moue.model.registry import registry
from moue.model.topology import Topology

BALANCES: dict[str, type[Balance]] = {}


register_balance = registry(BALANCES)


def uelb_loss(loads_E: torch.Tensor, probs_LE: torch.Tensor, share_E: torch.Tensor) -> torch.Tensor:
    """L_uelb = sum_e F_e * mean_l(P_le) / Q_e (``loads_E`` = F, ``share_E`` = Q)."""
    return (loads_E * probs_LE.mean(dim=0) / share_E).sum()


def group_switch_loss(tokens_per_expert_E: torch.Tensor, probs_sum_E: torch.Tensor,
                      tokens: torch.Tensor | int, groups: int) -> torch.Tensor:
    """Switch loss of one layer over expert groups (expert e in group e mod ``groups``)."""
    counts_G = tokens_per_expert_E.float().view(-1, groups).sum(dim=0)
    fraction_G = counts_G / counts_G.sum().clamp(min=1)
    return groups * (fraction_G * probs_sum_E.view(-1, groups).sum(dim=0) / tokens).sum()


def switch_loss(fraction_E: torch.Tensor, probs_E: torch.Tensor, window: int) -> torch.Tensor:
    """Switch/GShard loss of one layer over its window: W * sum_e f_e P_e (1 when uniform)."""
    return window * (fraction_E * probs_E).sum()


class Balance(torch.nn.Module):
    """The pool's balance state, one per model, shared by every router on the stage.

    Buffers: ``loads_E`` (F of the previous step, starts at Q), ``bias_E`` (aux_free selection
    bias), ``bias_LE`` (the expert-parallel selection bias per MoE layer), ``counts_LE``
    (assignments per MoE layer and expert during the current step; not checkpointed; its column
    sums are the pool's counts).
    """

    name = "none"

    def __init__(self, topology: Topology, coeff: float, rate: float = 0.0,
                 ep_coeff: float = 0.0, ep_groups: int = 1, ep_rate: float = 0.0):
        super().__init__()
        self.num_layers, self.window, self.coeff, self.rate = (
            topology.num_layers, topology.window, coeff, rate)
        self.ep_coeff, self.ep_groups, self.ep_rate = ep_coeff, ep_groups, ep_rate
        self.register_buffer("share_E", topology.uniform_share_E.clone(), persistent=False)
        self.register_buffer("mask_LE", topology.mask_LE.float(), persistent=False)
        self.register_buffer("loads_E", topology.uniform_share_E.clone())
        self.register_buffer("bias_E", torch.zeros(topology.num_experts))
        self.register_buffer("bias_LE", torch.zeros(topology.num_layers, topology.num_experts))
        self.register_buffer("counts_LE", torch.zeros(topology.num_layers, topology.num_experts),
                             persistent=False)
        self.set_eligibility(None)

    def set_eligibility(self, mask_LE: torch.Tensor | None) -> None:
        """The step's effective eligibility [L, E] (skipped layers' rows all False), or None for
        the whole model (``moue.elastic.apply`` sets it)."""
        self.active_share_E = None
        self.active_mask_LE = None
        self.active_layers, self.active_window = self.num_layers, self.window
        if mask_LE is not None:
            self.active_mask_LE = mask_LE.float().to(self.share_E.device)
            rows = mask_LE[mask_LE.any(dim=1)].float()
            self.active_layers, self.active_window = rows.shape[0], int(rows[0].sum())
            self.active_share_E = (rows / rows.sum(dim=1, keepdim=True)).mean(dim=0).to(
                self.share_E.device)

    @property
    def step_share_E(self) -> torch.Tensor:
        """The share of each expert under this step's eligibility (Q or Q')."""
        return self.share_E if self.active_share_E is None else self.active_share_E

    @property
    def counts_E(self) -> torch.Tensor:
        return self.counts_LE.sum(dim=0)

    def count(self, layer: int, routing_map_TE: torch.Tensor) -> None:
        """Add MoE layer ``layer``'s assignments (pool ids) to the step's counts."""
        self.counts_LE[layer] += routing_map_TE.sum(dim=0).to(self.counts_LE.dtype)

    def layer_loss(self, probs_sum_E: torch.Tensor, tokens: torch.Tensor | int,
                   tokens_per_expert_E: torch.Tensor | None) -> torch.Tensor | None:
        """One layer's balance loss (before ``coeff``), or None.

        ``probs_sum_E``: router probabilities summed over this rank's tokens (carries gradient);
        ``tokens``: tokens of the micro-batch over the sequence-parallel group, so that summing the
        ranks' terms gives the loss of the whole micro-batch; ``tokens_per_expert_E``: assignments
        of this micro-batch over that group (used by per_layer only).
        """
        return None

    def ep_layer_loss(self, probs_sum_E, tokens, tokens_per_expert_E) -> torch.Tensor | None:
        """One layer's expert-parallel balance loss (before ``ep_coeff``), or None when off."""
        if not self.ep_coeff or self.ep_groups == 1:
            return None
        return group_switch_loss(tokens_per_expert_E, probs_sum_E, tokens,
                                 self.ep_groups) / self.active_layers

    def expert_bias(self) -> torch.Tensor | None:
        """The per-expert selection bias of the balance rule (aux_free), or None."""
        return None

    def selection_bias(self, layer: int) -> torch.Tensor | None:
        """Bias [E] added to MoE layer ``layer``'s scores for top-k selection only, or None."""
        bias_E = self.expert_bias()
        if self.ep_rate:  # applied even where it no longer moves (G = 1: a sub-model on one rank)
            bias_E = self.bias_LE[layer] if bias_E is None else bias_E + self.bias_LE[layer]
        return bias_E

    def largest_selection_bias(self) -> float:
        """The largest |bias| any layer's selection adds (0: the choice is the router's own)."""
        return max(float(self.bias_E.abs().max()), float(self.bias_LE.abs().max()))

    @torch.no_grad()
    def end_step(self, global_counts_LE: torch.Tensor) -> None:
        """Take the step's counts per MoE layer and expert, summed over all ranks: the pool's
        column sums become the next step's loads F, and the EP selection bias moves."""
        if self.ep_rate and self.ep_groups > 1:
            self._move_ep_bias(global_counts_LE)
        global_counts_E = global_counts_LE.sum(dim=0)
        total = global_counts_E.sum()
        if total > 0:
            loads_E = global_counts_E / total
            if self.active_share_E is not None:  # relative to the sub-model's shares
                reached_E = self.active_share_E > 0
                loads_E = torch.where(reached_E, loads_E / self.active_share_E.clamp(min=1e-30)
                                      * self.share_E, self.share_E)
            self.loads_E.copy_(loads_E)
        self.counts_LE.zero_()

    def _move_ep_bias(self, counts_LE: torch.Tensor) -> None:
        """``b_lg += rate * sign(n_l * s_lg - n_lg)`` (module docstring); a layer that routed
        nothing this step (skipped by an elastic sub-model) keeps its bias."""
        layers, experts = counts_LE.shape
        mask_LE = self.mask_LE if self.active_mask_LE is None else self.active_mask_LE
        grouped = (layers, experts // self.ep_groups, self.ep_groups)  # e = i * G + g
        counts_LG = counts_LE.view(grouped).sum(dim=1)
        eligible_LG = mask_LE.view(grouped).sum(dim=1)
        total_L1 = counts_LG.sum(dim=1, keepdim=True)
        share_LG = eligible_LG / eligible_LG.sum(dim=1, keepdim=True).clamp(min=1)
        step_LG = self.ep_rate * torch.sign(total_L1 * share_LG - counts_LG)
        step_LG = torch.where(total_L1 > 0, step_LG, 0.0)
        self.bias_LE += step_LG.repeat(1, experts // self.ep_groups)  # expert e: column e mod G


register_balance("none")(Balance)


@register_balance("uelb")
class UniversalExpertLoadBalance(Balance):
    def layer_loss(self, probs_sum_E, tokens, tokens_per_expert_E):
        # F_e / Q_e, fixed within the step (0 for an expert no layer can reach: Q_e = 0)
        weight_E = torch.where(self.share_E > 0, self.loads_E / self.share_E.clamp(min=1e-30), 0.0)
        return (weight_E * probs_sum_E).sum() / (tokens * self.active_layers)


@register_balance("per_layer")
class PerLayerBalance(Balance):
    """The classic Switch loss of each layer over its window, averaged over layers."""

    def layer_loss(self, probs_sum_E, tokens, tokens_per_expert_E):
        fraction_E = tokens_per_expert_E / tokens_per_expert_E.sum()
        return (switch_loss(fraction_E, probs_sum_E / tokens, self.active_window)
                / self.active_layers)


@register_balance("aux_free")
class AuxFreeBalance(Balance):
    """No loss: a per-expert selection bias nudged toward the exposure-weighted share Q_e."""

    def expert_bias(self):
        return self.bias_E

    @torch.no_grad()
    def end_step(self, global_counts_LE):
        global_counts_E = global_counts_LE.sum(dim=0)
        total = global_counts_E.sum()
        if total > 0:
            self.bias_E += self.rate * torch.sign(self.step_share_E - global_counts_E / total)
        super().end_step(global_counts_LE)


def build_balance(kind: str, topology: Topology, coeff: float, rate: float,
                  ep_coeff: float = 0.0, ep_groups: int = 1, ep_rate: float = 0.0) -> Balance:
    return BALANCES[kind](topology, coeff, rate, ep_coeff, ep_groups, ep_rate)
