"""The sub-model of each optimizer step (``elastic.granularity=step``).

Step ``t`` (0-based: the number of steps done before it) draws from a generator seeded by
``(train.seed, t)`` alone, so every rank of every layout draws the same sub-model with no
communication, and a resumed run draws the same sequence. Per axis: the full value with
probability ``<axis>_full_prob``, else one of the reduced choices uniformly; then the layer and
expert sets by the configured policies (``moue.elastic.submodel``). The last number drawn seeds
the step's co-activation sampling in the routers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moue.elastic.config import Choices, ElasticConfig
from moue.elastic.submodel import (
    SubModel,
    nested_experts,
    random_experts,
    random_layers,
    spread_layers,
)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def pick_size(gen: torch.Generator, full: int, reduced: tuple, full_prob: float) -> int:
    """The full value with probability ``full_prob``, else one of ``reduced`` uniformly (two
    draws from ``gen`` whatever the outcome, so later draws do not depend on it)."""
    coin = torch.rand((), generator=gen).item()
    pick = torch.randint(len(reduced) or 1, (), generator=gen).item()
    return full if not reduced or coin < full_prob else reduced[pick]


def kept_sets(elastic: ElasticConfig, choices: Choices, depth: int, width: int,
              gen: torch.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The layers and pool experts a draw of ``depth`` and ``width`` keeps, by the policies."""
    c = choices
    layers = (random_layers(c.num_layers, depth, gen) if elastic.layers_policy == "random"
              else spread_layers(c.num_layers, depth))
    if width == c.num_experts:
        experts = tuple(range(c.num_experts))
    elif elastic.experts_policy == "random":
        experts = random_experts(c.num_experts, c.block_size, width, gen)
    else:
        experts = nested_experts(c.num_experts, c.block_size, width)
    return layers, experts


@dataclass(frozen=True)
class Draw:
    submodel: SubModel
    routing_seed: int  # seeds co-activation sampling in the routers for this step


class Schedule:
    def __init__(self, elastic: ElasticConfig, choices: Choices, seed: int):
        self.elastic, self.choices, self.seed = elastic, choices, seed

    def draw(self, step: int) -> Draw:
        e, c = self.elastic, self.choices
        gen = step_generator(self.seed, step)
        depth = pick_size(gen, c.num_layers, c.layers, e.layers_full_prob)
        width = pick_size(gen, c.num_experts, c.experts, e.experts_full_prob)
        topk = pick_size(gen, c.full_topk, c.topk, e.topk_full_prob)
        layers, experts = kept_sets(e, c, depth, width, gen)
        routing_seed = int(torch.randint(2**62, (), generator=gen).item())
        return Draw(SubModel(layers, experts, topk), routing_seed)
