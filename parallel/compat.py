"""Megatron-Core version compatibility: what differs between the releases moue supports.

Supported: megatron-core 0.16.1 (what Python 3.11 gets) through 0.19.x (Python 3.12 GPU images).
Import this module before ``megatron.core`` (``import parallel`` does).

megatron-core 0.19 imports Triton kernels for the MoE "paged stash" at import time
(``megatron/core/transformer/moe/ops/paged_stash.py``), so ``import megatron.core`` fails where
Triton is not installed (CPU machines). When Triton is missing, a stand-in is registered under
that one module name; its kernels raise if a run ever asks for the paged stash (a GPU-only
feature). A fake top-level ``triton`` package is not used: it breaks ``torch._dynamo``.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


class _NeedsTriton:
    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise RuntimeError(f"{self.name}: the MoE paged stash needs Triton and a GPU; "
                           "install triton or turn the paged stash off.")


def install_paged_stash_stand_in() -> bool:
    """Register the stand-in when Triton cannot be imported; returns whether it did."""
    if PAGED_STASH_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return False
    stand_in = types.ModuleType(PAGED_STASH_OPS, "Stand-in: Triton is not installed.")
    stand_in.GLOBAL_BLOCK_SIZE = 1024
    stand_in.paged_stash_copy_kernel = _NeedsTriton("paged_stash_copy_kernel")
    stand_in.paged_stash_pop_kernel = _NeedsTriton("paged_stash_pop_kernel")
    sys.modules[PAGED_STASH_OPS] = stand_in
    return True


def load_distributed_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for Megatron's distributed optimizer, with two
    fixes for torch's Adam (no Transformer Engine / apex), measured on megatron-core 0.16:

    - ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every per-parameter
      state key from the loaded tensors of the ``fully_reshardable`` format, which never hold
      Adam's ``step``: ``KeyError: 'step'``. Missing keys are taken from the destination itself
      (a no-op copy that keeps the step ``load_state_dict`` restored).
    - ``load_state_dict`` gives every parameter the *same* ``step`` tensor; torch's Adam adds 1
      to it in place per parameter, so after one step it reads 2 + (number of parameters) and
      bias correction goes wrong. Each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        missing = {k: v for k, v in state.items() if k not in tensors and torch.is_tensor(v)}
        return original(self, model_param, {**tensors, **missing})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in part.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def forget_moe_metrics() -> None:
    """Drop the entries of Megatron's MoE figure tracker, each of which holds the process groups
    it reduces over. 0.16 keeps them in ``moe_utils``' dict; 0.17+ in ``moe_logging``'s
    ``MoEMetricsTracker`` (whose ``clear`` only zeroes the values, and whose old getter returns
    a copy)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        get_moe_metrics_tracker().metrics.clear()
