"""Stand-ins for Transformer Engine's linears in the pool, where Transformer Engine cannot run.

On a GPU with Transformer Engine the pool's GEMMs are TE's: ``GroupedLinear`` in the grouped
pool (Megatron's ``TEGroupedMLP``) and ``Linear``, through Megatron's ``TEColumnParallelLinear``
/ ``TERowParallelLinear``, for each expert of the sequential pool. Elsewhere they are:

- ``TorchGroupedLinear`` (and its row-parallel twin): the grouped pool's GEMMs on torch's native
  ``torch._grouped_mm``, with the constructor, call (``x, m_splits -> (y, None)``), parameters
  (``weight0 .. weight{n-1}``, each ``[out, in]``) and checkpoint entries (``<prefix>weight``,
  expert axis prepended, and an empty ``_extra_state``) of TE's ``GroupedLinear`` in Megatron's
  wrapper. ``torch._grouped_mm`` wants 16-byte aligned rows: ``hidden_size`` and the expert FFN
  size a multiple of 4 (fp32) or 8 (bf16); ``moue.run_check`` checks this before building.
- ``TorchExpertColumnLinear`` / ``TorchExpertRowLinear``: Megatron's local expert linears
  (parameters, initialisation and checkpoint entries unchanged) called as TE's ``Linear`` is.
  The sequential pool uses them with gradient-accumulation fusion; without it Megatron's local
  linears, which accumulate into ``main_grad`` on every call, are already what TE's would do.

Both keep what moue's code depends on in Transformer Engine (docs/gpu.md has the source read):

- Megatron's wrapper state: ``is_first_microbatch`` is True when built (and set True again by
  ``MegatronModule.set_is_first_microbatch`` at a step's first micro-batch under FP8), passed to
  the GEMM, then set False after each call; ``None`` is passed instead when
  ``disable_parameter_transpose_cache`` is set.
- TE's weight-gradient contract under ``config.gradient_accumulation_fusion``: the backward writes
  the weight gradient into ``weight.main_grad``, accumulating unless the call had
  ``is_first_microbatch`` True (then it overwrites, with zeros for a GEMM without tokens), sets
  ``weight.grad_added_to_main_grad`` and returns a dummy gradient of the weight's full size
  (zeros under ``zero_out_wgrad``), which Megatron DDP's hook drops. Without fusion the
  gradient goes through autograd, as torch computes it.

Not emulated: FP8 (TE's quantized GEMMs and the weight copies it caches between calls), which
need a GPU. Expert tensor parallelism needs no communication here: as in Megatron's expert
linears, the token dispatcher gathers and scatters over the expert-tensor-parallel group, so a
column-parallel layer holds ``out/ETP`` rows and a row-parallel one ``in/ETP`` columns.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

EXTRA_STATE = "_extra_state"


def parameter_device(config) -> torch.device:
    """Where Megatron-Core creates a layer's weights: the CPU under ``use_cpu_initialization``,
    else the current GPU (what its own linears do)."""
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class WrapperState:
    """Megatron's TE-wrapper state between calls: what the next GEMM is told of the micro-batch."""

    def _init_wrapper_state(self, config) -> None:
        self.config = config
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = config.disable_parameter_transpose_cache

    def _next_is_first_microbatch(self) -> bool | None:
        first = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        self.is_first_microbatch = False
        return first


def _dummy_wgrad(weight: torch.Tensor) -> torch.Tensor | None:
    """What TE returns as the weight gradient once it has written it into ``main_grad``."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    return torch.zeros(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)


def _gemm(x: torch.Tensor, weights, offsets) -> torch.Tensor:
    if offsets is None:  # one GEMM (TE's Linear)
        return x @ weights[0].t()
    return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offsets)


class _FusedWgradGemm(torch.autograd.Function):
    """``y = x W_g^T`` for consecutive row groups ``g``, with TE's fused weight gradient:
    ``main_grad`` accumulates (``accumulate``) or is overwritten by each group's ``dy_g^T x_g``."""

    @staticmethod
    def forward(ctx, x, offsets, accumulate, *weights):
        ctx.save_for_backward(x, offsets, *weights)
        ctx.accumulate = accumulate
        return _gemm(x, weights, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, offsets, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        if offsets is None:
            dx, wgrads = dy @ weights[0], [dy.t() @ x]
        else:  # the grouped GEMMs of torch's own backward; zeros for a group without rows
            dx = torch._grouped_mm(dy, torch.stack(weights), offs=offsets)
            wgrads = torch._grouped_mm(dy.t(), x, offs=offsets)
        returned = []
        for weight, wgrad in zip(weights, wgrads, strict=True):
            if ctx.accumulate:
                weight.main_grad.add_(wgrad)
            else:
                weight.main_grad.copy_(wgrad)
            returned.append(_dummy_wgrad(weight))
        return dx, None, None, *returned


def fused_wgrad_gemm(x: torch.Tensor, weights: list[torch.Tensor], m_splits: list[int] | None,
                     is_first_microbatch: bool | None) -> torch.Tensor:
    """TE's GEMM with ``fuse_wgrad_accumulation`` (accumulate unless ``is_first_microbatch``):
    one grouped GEMM over consecutive row groups of ``m_splits`` rows, or (None) one GEMM."""
    offsets = (None if m_splits is None
               else torch.tensor(m_splits, device=x.device).cumsum(0).to(torch.int32))
    return _FusedWgradGemm.apply(x, offsets, not is_first_microbatch, *weights)


class TorchGroupedLinear(WrapperState, torch.nn.Module):
    """``num_gemms`` linears applied to consecutive groups of rows in one grouped GEMM."""

    tp_axis = 0  # column-parallel: output rows split over the expert-TP ranks (row: 1, inputs)

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method,
                 bias: bool, skip_bias_add: bool, is_expert: bool, pg_collection,
                 tp_comm_buffer_name=None, name=None):
        super().__init__()
        if bias:
            raise ValueError("TorchGroupedLinear has no bias (moue builds with add_bias_linear=False)")
        self._init_wrapper_state(config)
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
                                                    dtype=config.params_dtype,
                                                    device=parameter_device(config)))
            init_method(weight)
            # As Megatron's expert linears: under expert parallelism, reduced over the
            # expert-data-parallel ranks by Megatron DDP, not over all data-parallel ranks.
            weight.allreduce = not (is_expert and config.expert_model_parallel_size > 1)
            # Split over the expert-tensor-parallel ranks: the grad norm sums every shard.
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=self.tp_axis,
                                                 stride=1)
            setattr(self, f"weight{i}", weight)

    def forward(self, x: torch.Tensor, m_splits: list[int]):
        first = self._next_is_first_microbatch()
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        if self.config.gradient_accumulation_fusion:
            return fused_wgrad_gemm(x, weights, m_splits, first), None
        offsets = torch.tensor(m_splits, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offsets), None

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


class _ExpertLinear(WrapperState):
    """A Megatron local expert linear called as Transformer Engine's ``Linear`` with
    ``fuse_wgrad_accumulation``: one GEMM, its weight gradient delivered into ``main_grad``."""

    def _check_expert(self, is_expert: bool, bias: bool) -> None:
        if not is_expert or bias:
            raise ValueError(f"{type(self).__name__} stands in for a bias-free expert linear")
        self._init_wrapper_state(self.config)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        first = self._next_is_first_microbatch()
        if not self.config.gradient_accumulation_fusion:
            return super().forward(x, *args, **kwargs)  # Megatron's local linear
        rows = x.reshape(-1, x.shape[-1])
        y = fused_wgrad_gemm(rows, [self.weight], None, first)
        return y.reshape(*x.shape[:-1], y.shape[-1]), None


class TorchExpertColumnLinear(_ExpertLinear, ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, bias, is_expert,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, is_expert=is_expert, **kwargs)
        self._check_expert(is_expert, bias)


class TorchExpertRowLinear(_ExpertLinear, RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, bias, is_expert,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, is_expert=is_expert, **kwargs)
        self._check_expert(is_expert, bias)
