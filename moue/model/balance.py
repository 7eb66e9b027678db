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

This module does no communication: routers hand it token-summed statistics.
"""

from __future__ import annotations

import torch

from moue.model.topology import Topology

BALANCES: dict[str, type[Balance]] = {}


def register_balance(name: str):
    def register(cls):
        cls.name = name
        BALANCES[name] = cls
        return cls
    return register


def uelb_loss(loads_E: torch.Tensor, probs_LE: torch.Tensor, share_E: torch.Tensor) -> torch.Tensor:
    """L_uelb = sum_e F_e * mean_l(P_le) / Q_e (``loads_E`` = F, ``share_E`` = Q)."""
    return (loads_E * probs_LE.mean(dim=0) / share_E).sum()


def switch_loss(fraction_E: torch.Tensor, probs_E: torch.Tensor, window: int) -> torch.Tensor:
    """Switch/GShard loss of one layer over its window: W * sum_e f_e P_e (1 when uniform)."""
    return window * (fraction_E * probs_E).sum()


class Balance(torch.nn.Module):
    """The pool's balance state, one per model, shared by every router on the stage.

    Buffers: ``loads_E`` (F of the previous step, starts at Q), ``bias_E`` (aux_free selection
    bias), ``counts_LE`` (assignments per MoE layer and expert during the current step; not
    checkpointed; its column sums are the pool's counts).
    """

    name = "none"

    def __init__(self, topology: Topology, coeff: float, rate: float = 0.0):
        super().__init__()
        self.num_layers, self.window, self.coeff, self.rate = (
            topology.num_layers, topology.window, coeff, rate)
        self.register_buffer("share_E", topology.uniform_share_E.clone(), persistent=False)
        self.register_buffer("loads_E", topology.uniform_share_E.clone())
        self.register_buffer("bias_E", torch.zeros(topology.num_experts))
        self.register_buffer("counts_LE", torch.zeros(topology.num_layers, topology.num_experts),
                             persistent=False)

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

    def selection_bias(self) -> torch.Tensor | None:
        """Bias added to scores for top-k selection only (aux_free), or None."""
        return None

    @torch.no_grad()
    def end_step(self, global_counts_E: torch.Tensor) -> None:
        """Take the step's counts, summed over all ranks, as the next step's loads F."""
        total = global_counts_E.sum()
        if total > 0:
            self.loads_E.copy_(global_counts_E / total)
        self.counts_LE.zero_()


register_balance("none")(Balance)


@register_balance("uelb")
class UniversalExpertLoadBalance(Balance):
    def layer_loss(self, probs_sum_E, tokens, tokens_per_expert_E):
        weight_E = self.loads_E / self.share_E  # F_e / Q_e: fixed within the step
        return (weight_E * probs_sum_E).sum() / (tokens * self.num_layers)


@register_balance("per_layer")
class PerLayerBalance(Balance):
    """The classic Switch loss of each layer over its window, averaged over layers."""

    def layer_loss(self, probs_sum_E, tokens, tokens_per_expert_E):
        fraction_E = tokens_per_expert_E / tokens_per_expert_E.sum()
        return switch_loss(fraction_E, probs_sum_E / tokens, self.window) / self.num_layers


@register_balance("aux_free")
class AuxFreeBalance(Balance):
    """No loss: a per-expert selection bias nudged toward the exposure-weighted share Q_e."""

    def selection_bias(self):
        return self.bias_E

    @torch.no_grad()
    def end_step(self, global_counts_E):
        total = global_counts_E.sum()
        if total > 0:
            self.bias_E += self.rate * torch.sign(self.share_E - global_counts_E / total)
        super().end_step(global_counts_E)


def build_balance(kind: str, topology: Topology, coeff: float, rate: float) -> Balance:
    return BALANCES[kind](topology, coeff, rate)
