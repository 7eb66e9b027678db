"""What a sub-model keeps: layers, pool experts and top-k; how a size becomes a set; the family.

A sub-model of depth ``d`` keeps ``d`` of the ``L`` layers:
- ``spread``: evenly spaced, the first and the last always kept (``d = 1`` keeps the first):
  layer ``floor(i * (L-1)/(d-1) + 1/2)`` for ``i < d``; a fixed set per ``d``;
- ``random``: the first and the last, and ``d - 2`` others drawn afresh.

A sub-model of width ``m`` keeps ``m / B`` experts of each of the ``B`` blocks of consecutive
pool experts that windows are made of (``Topology.block_size``), so every window keeps the same
share:
- ``nested``: the first ``m / B`` of each block (smaller widths are subsets of larger ones);
- ``random``: a fresh subset of each block.

Evaluation and export use the fixed sets (``spread``, ``nested``) whatever the training policy:
under ``random`` every subset was trained alike, and a fixed one makes the result reproducible.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from parallel.errors import UserError


@dataclass(frozen=True)
class SubModel:
    layers: tuple[int, ...]  # kept layers, 0-based over the whole model (dense layers too)
    experts: tuple[int, ...]  # kept pool experts, ascending
    topk: int

    @property
    def label(self) -> str:
        return f"layers={len(self.layers)},experts={len(self.experts)},topk={self.topk}"


def spread_layers(num_layers: int, depth: int) -> tuple[int, ...]:
    if depth == 1:
        return (0,)
    # floor(i*(L-1)/(d-1) + 1/2) in integers: no float rounding, the same on every machine
    return tuple((2 * i * (num_layers - 1) + depth - 1) // (2 * (depth - 1)) for i in range(depth))


def random_layers(num_layers: int, depth: int, gen: torch.Generator) -> tuple[int, ...]:
    if depth == 1:
        return (0,)
    middle = (torch.randperm(num_layers - 2, generator=gen)[:depth - 2] + 1).tolist()
    return tuple(sorted({0, num_layers - 1, *middle}))


def nested_experts(num_experts: int, block_size: int, width: int) -> tuple[int, ...]:
    per_block = width * block_size // num_experts
    return tuple(e for e in range(num_experts) if e % block_size < per_block)


def random_experts(num_experts: int, block_size: int, width: int,
                   gen: torch.Generator) -> tuple[int, ...]:
    per_block = width * block_size // num_experts
    kept = [b * block_size + torch.randperm(block_size, generator=gen)[:per_block]
            for b in range(num_experts // block_size)]
    return tuple(sorted(torch.cat(kept).tolist()))


def fixed(choices, layers: int, experts: int, topk: int) -> SubModel:
    """The sub-model of these sizes that evaluation and export use (``spread``, ``nested``)."""
    kept_experts = (tuple(range(choices.num_experts)) if experts == choices.num_experts
                    else nested_experts(choices.num_experts, choices.block_size, experts))
    return SubModel(spread_layers(choices.num_layers, layers), kept_experts, topk)


def full(choices) -> SubModel:
    return fixed(choices, choices.num_layers, choices.num_experts, choices.full_topk)


def family(choices) -> list[SubModel]:
    """Every combination of the configured sizes (full ones included), largest first."""
    sizes = itertools.product((choices.num_layers, *reversed(choices.layers)),
                              (choices.num_experts, *reversed(choices.experts)),
                              (choices.full_topk, *reversed(choices.topk)))
    return [fixed(choices, *s) for s in sizes]


def parse(text: str, choices, window: int) -> SubModel:
    """``layers=3,experts=8,topk=1`` (axes left out take the full value) as a sub-model;
    ``UserError`` naming the axis, the value and the fix."""
    sizes = {"layers": choices.num_layers, "experts": choices.num_experts,
             "topk": choices.full_topk}
    for item in filter(None, text.split(",")):
        axis, eq, value = item.partition("=")
        axis = axis.strip()
        if axis not in sizes or not eq:
            raise UserError(f"--submodel {text!r}: unknown axis {axis!r}; write "
                            "layers=L,experts=M,topk=K (any of them)")
        if not re.fullmatch(r"\s*\d+\s*", value):
            raise UserError(f"--submodel {text!r}: {axis}={value!r} must be a whole number")
        sizes[axis] = int(value)
    layers, experts, topk = sizes["layers"], sizes["experts"], sizes["topk"]
    if not 1 <= layers <= choices.num_layers:
        raise UserError(f"--submodel {text!r}: layers={layers} must be between 1 and "
                        f"model.num_layers={choices.num_layers}")
    blocks = choices.num_experts // choices.block_size if choices.block_size else None
    if experts != choices.num_experts and not (
            blocks and 1 <= experts < choices.num_experts and experts % blocks == 0):
        raise UserError(f"--submodel {text!r}: experts={experts} must be moe.num_experts="
                        f"{choices.num_experts} or a smaller multiple of the "
                        f"{blocks or 'no'} blocks of pool experts the windows are made of")
    narrowest = (window if experts == choices.num_experts
                 else (experts // blocks) * window // choices.block_size)
    if not 1 <= topk <= narrowest:
        raise UserError(f"--submodel {text!r}: topk={topk} must be between 1 and the "
                        f"{narrowest} experts this sub-model leaves in a window")
    return fixed(choices, layers, experts, topk)
