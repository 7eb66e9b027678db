"""A grouped linear layer on torch's native grouped GEMM, for the grouped pool without
Transformer Engine.

``moue.model.pool.GroupedExpertPool`` is Megatron-Core's ``TEGroupedMLP``; on GPUs its two linears
are Transformer Engine's ``GroupedLinear``. ``TorchGroupedLinear`` is a stand-in with the same
constructor, call (``x, m_splits -> (y, None)``), parameters (``weight0 .. weight{n-1}``, each
``[out, in]``) and checkpoint layout (key ``<prefix>weight``, expert axis prepended, in
Megatron's contiguous expert order like TE's), built on ``torch._grouped_mm``: it lets the
grouped pool run, be compared with the sequential pool, and exchange checkpoints with it on a
CPU. ``torch._grouped_mm`` wants 16-byte aligned rows: ``hidden_size`` and the expert FFN size a
multiple of 4 (fp32) or 8 (bf16); ``moue.run_check`` checks this before a model is built.

Expert tensor parallelism needs no communication here: as in Megatron's expert linears, the
token dispatcher gathers and scatters over the expert-tensor-parallel group, so a column-parallel
layer holds ``out/ETP`` rows and a row-parallel one ``in/ETP`` columns.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

EXTRA_STATE = "_extra_state"


class TorchGroupedLinear(torch.nn.Module):
    """``num_gemms`` linears applied to consecutive groups of rows in one grouped GEMM."""

    tp_axis = 0  # column-parallel: output rows split over the expert-TP ranks (row: 1, inputs)

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method,
                 bias: bool, skip_bias_add: bool, is_expert: bool, pg_collection,
                 tp_comm_buffer_name=None, name=None):
        super().__init__()
        if bias:
            raise ValueError("TorchGroupedLinear has no bias (moue builds with add_bias_linear=False)")
        self.num_gemms = num_gemms
        self.ep_group, self.tp_group = pg_collection.ep, pg_collection.expt_tp
        self.dp_cp_group = pg_collection.expt_dp
        tp = self.tp_group.size()
        if self.tp_axis == 0:
            output_size //= tp
        else:
            input_size //= tp
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(output_size, input_size,
                                                    dtype=config.params_dtype))
            init_method(weight)
            # As Megatron's expert linears: under expert parallelism, reduced over the
            # expert-data-parallel ranks by Megatron DDP, not over all data-parallel ranks.
            weight.allreduce = not (is_expert and config.expert_model_parallel_size > 1)
            # Split over the expert-tensor-parallel ranks: the grad norm sums every shard.
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=self.tp_axis,
                                                 stride=1)
            setattr(self, f"weight{i}", weight)

    def forward(self, x: torch.Tensor, m_splits: list[int]):
        weights = torch.stack([getattr(self, f"weight{i}") for i in range(self.num_gemms)])
        offsets = torch.tensor(m_splits, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Per GEMM, a ShardedTensor under ``<prefix>weight`` and an (empty) ShardedObject under
        ``<prefix>_extra_state``, expert axis in Megatron order: the entries TE's GroupedLinear
        and Megatron's per-expert linears write, so checkpoints move between the pools."""
        ep_rank, ep = self.ep_group.rank(), self.ep_group.size()
        out = {}
        for i in range(self.num_gemms):
            offsets = (*sharded_offsets,
                       (len(sharded_offsets), ep_rank * self.num_gemms + i, ep * self.num_gemms))
            state = make_sharded_tensors_for_checkpoint(
                {"weight": getattr(self, f"weight{i}"), EXTRA_STATE: None}, prefix,
                {"weight": self.tp_axis}, offsets, tp_group=self.tp_group,
                dp_cp_group=self.dp_cp_group)
            out[f"{prefix}weight{i}"] = state[f"{prefix}weight"]
            out[f"{prefix}{EXTRA_STATE}{i}"] = state[f"{prefix}{EXTRA_STATE}"]
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + EXTRA_STATE)]:
            del state_dict[key]  # nothing to restore: this layer has no FP8 metadata
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TorchRowParallelGroupedLinear(TorchGroupedLinear):
    tp_axis = 1
