"""Initial weights that do not depend on the parallel layout.

Megatron-Core's own initialisation depends on the layout: pipeline stages offset the seed, and
experts draw from the expert-parallel RNG stream. So the same config under TP=2, EP=2, PP=2
or one process would start from different models. Here each parameter is drawn from its
*global* checkpoint key instead (``sharded_state_dict`` gives key, global shape and this rank's
offsets), with Megatron's distributions:
- normal(0, ``init_method_std``) for weights;
- std / sqrt(2 * num_layers) for the projections that write into the residual stream
  (``linear_proj``, ``linear_fc2``);
- ones for norm weights and zeros for biases.

A tensor with leading "stacked" axes (layers, experts) is drawn one slice per index of those
axes, seeded by the index, so a rank draws only the experts and layers it holds.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def _seed(seed: int, key: str, index: tuple[int, ...]) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{key}{index}".encode())) % (2**63)


@torch.no_grad()
def init_by_global_key(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> int:
    """Initialise every parameter of ``model`` from its global key; returns how many."""
    params = {p.data_ptr(): p for p in model.parameters()}
    done = set()
    for sh, param in sharded_parameters(model.sharded_state_dict().values()):
        if not torch.is_tensor(param) or param.data_ptr() not in params:
            continue
        stacked = sh.prepend_axis_num
        shape = tuple(sh.global_shape[stacked:])
        own = [slice(o, o + n)
               for o, n in zip(sh.global_offset[stacked:], sh.data.shape, strict=True)]
        value = _draw(sh.key, shape, seed, tuple(sh.global_offset[:stacked]), std, num_layers)
        sh.data.copy_(value[tuple(own)].to(sh.data.dtype))
        done.add(param.data_ptr())
    missing = [n for n, p in model.named_parameters() if p.data_ptr() not in done]
    if missing:
        raise RuntimeError(f"no global key for parameters {missing}; they would keep Megatron's "
                           "layout-dependent initialisation")
    return len(done)


def sharded_parameters(entries):
    """(sharded tensor, the parameter it writes) pairs. A factory (SwiGLU's fc1: gate and up,
    each sharded on its own) is built into sharded tensors over views of its parameter."""
    for sh in entries:
        if isinstance(sh, ShardedTensorFactory):
            parts = sh.build()
            for part in parts.values() if isinstance(parts, dict) else parts:
                yield part, sh.data
        else:
            yield sh, getattr(sh, "data", None)


def _draw(key, shape, seed, index, std, num_layers) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    scale = std / math.sqrt(2 * num_layers) if key.endswith(RESIDUAL_OUTPUTS) else std
    g = torch.Generator().manual_seed(_seed(seed, key, index))
    return torch.randn(shape, generator=g) * scale
