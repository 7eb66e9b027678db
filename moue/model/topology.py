"""Which pool experts each MoE layer may route to: the eligibility mask ``mask_LE`` [L, E].

Shapes: ``L`` MoE layers, ``E`` pool experts, ``W`` experts per window (equal for every layer).

- ``standard``: ``E = L*N``, layer ``l`` sees ``[l*N, (l+1)*N)`` - exactly a classic MoE.
- ``rotational``: a ring; layer ``l`` sees ``{(l*s + j) mod E : j < w}``. Adjacent layers share
  ``w - s`` experts. With ``w = s = N`` and ``E = L*N`` it equals ``standard``.
- ``full``: every layer sees the whole pool.
- ``explicit``: the pool ids of each layer's window, listed (``moe.eligibility``); what
  ``moue-export`` writes for a sub-model (its kept layers' windows over its kept experts).

A topology is a small registered class; add one by subclassing ``Topology`` with
``@register_topology("name")``. Derived figures (reported at start and by ``--dry-run``):
exposure ``c_e`` (layers that can reach expert e), virtual width ``sum_l |S_l|``, reuse factor
``virtual width / E``, and ``Q_E`` (each expert's share under uniform routing in every window).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from moue.model.registry import registry
from parallel.errors import UserError

TOPOLOGIES: dict[str, type[Topology]] = {}


register_topology = registry(TOPOLOGIES)


class Topology(ABC):
    """Eligibility of pool experts per MoE layer, validated and with its derived figures.

    Built from plain numbers: ``num_layers`` MoE layers, a pool of ``num_experts``, ``topk``
    experts per token, and the rotational ``window`` / ``stride`` (ignored by the others). Every
    rule on these numbers is checked here, once; errors name the config field (``moe.*``).
    """

    name: ClassVar[str]

    def __init__(self, *, num_layers: int, num_experts: int, topk: int, window: int = 1,
                 stride: int = 1, eligibility: list | None = None):
        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        self.eligibility = eligibility
        self.mask_LE = self._mask(window, stride).bool()
        sizes = self.mask_LE.sum(dim=1)
        if not bool((sizes == sizes[0]).all()):
            raise UserError(f"moe.topology={self.name!r}: every layer needs a window of the same "
                             f"size; got {sizes.tolist()}")
        if int(sizes[0]) < topk:
            raise UserError(f"moe.topk={topk}: larger than the window of {int(sizes[0])} "
                             f"experts that topology {self.name!r} gives each layer; use "
                             f"moe.topk<={int(sizes[0])}")

    @abstractmethod
    def _mask(self, window: int, stride: int) -> torch.Tensor:
        """The boolean eligibility mask [L, E]."""

    def block_size(self, stride: int) -> int | None:
        """Size of the blocks of consecutive pool experts that every window is made of whole
        (elastic width keeps the same number from each block); None when there are none."""
        return None

    @property
    def window(self) -> int:
        return int(self.mask_LE[0].sum())

    def eligible(self, layer: int) -> torch.Tensor:
        """Pool ids eligible in MoE layer ``layer`` (0-based), ascending [W]: row i of the
        layer's router weight scores expert ``eligible(layer)[i]``."""
        return self.mask_LE[layer].nonzero().flatten()

    @property
    def exposure_E(self) -> torch.Tensor:
        return self.mask_LE.sum(dim=0)

    @property
    def virtual_width(self) -> int:
        return int(self.mask_LE.sum())

    @property
    def reuse_factor(self) -> float:
        return self.virtual_width / self.num_experts

    @property
    def uniform_share_E(self) -> torch.Tensor:
        """Q_E: mean over layers of 1/|S_l| on the window - sums to 1."""
        return (self.mask_LE.float() / self.mask_LE.sum(dim=1, keepdim=True)).mean(dim=0)


@register_topology("standard")
class Standard(Topology):
    def _mask(self, window, stride):
        per_layer, rest = divmod(self.num_experts, self.num_layers)
        if rest:
            raise UserError(
                f"moe.num_experts={self.num_experts}: the standard topology gives each of the "
                f"{self.num_layers} MoE layers its own block, so num_experts must be a multiple "
                f"of {self.num_layers} (e.g. {self.num_layers * max(1, per_layer)})")
        layer_of_expert = torch.arange(self.num_experts) // per_layer
        return layer_of_expert[None, :] == torch.arange(self.num_layers)[:, None]

    def block_size(self, stride):
        return self.num_experts // self.num_layers


@register_topology("rotational")
class Rotational(Topology):
    def _mask(self, window, stride):
        if window > self.num_experts:
            raise UserError(f"moe.window={window}: the window cannot be larger than the pool "
                             f"(moe.num_experts={self.num_experts}); use "
                             f"moe.window<={self.num_experts}")
        mask = torch.zeros(self.num_layers, self.num_experts, dtype=torch.bool)
        for layer in range(self.num_layers):
            mask[layer, (layer * stride + torch.arange(window)) % self.num_experts] = True
        return mask

    def block_size(self, stride):
        whole = self.num_experts % stride == 0 and self.window % stride == 0
        return stride if whole else None


@register_topology("full")
class Full(Topology):
    def _mask(self, window, stride):
        return torch.ones(self.num_layers, self.num_experts, dtype=torch.bool)

    def block_size(self, stride):
        return self.num_experts


@register_topology("explicit")
class Explicit(Topology):
    def _mask(self, window, stride):
        rows = self.eligibility
        if not isinstance(rows, list) or len(rows) != self.num_layers or not all(
                isinstance(r, list) and r for r in rows):
            raise UserError(f"moe.eligibility={rows!r}: the explicit topology needs one list of "
                            f"pool ids per MoE layer ({self.num_layers} lists)")
        mask = torch.zeros(self.num_layers, self.num_experts, dtype=torch.bool)
        for layer, ids in enumerate(rows):
            if not all(isinstance(e, int) and 0 <= e < self.num_experts for e in ids) or len(
                    set(ids)) != len(ids):
                raise UserError(f"moe.eligibility[{layer}]={ids}: must list distinct pool ids "
                                f"in [0, {self.num_experts}) (moe.num_experts={self.num_experts})")
            mask[layer, ids] = True
        return mask


def build_topology(kind: str, **numbers) -> Topology:
    """The topology ``kind`` (a registered name) of the given numbers (see ``Topology``)."""
    return TOPOLOGIES[kind](**numbers)
