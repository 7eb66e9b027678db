"""A model chunk on its own, from the config sections it reads, a validated layout and the run's
plan: what the Trainer trains and the conversion commands fill.

``build_chunk`` gives this rank's chunk (``moue.model.builder``), initialised from global keys
(``moue.model.init``: the same weights under every layout), or left uninitialised when a
checkpoint or a conversion supplies every weight (no time spent drawing numbers that are
overwritten, no fp32 master copies of each matrix: the chunk holds its weights once, in the
plan's precision).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from moue.config import ModelConfig, MoEConfig, TrainConfig
from moue.model.builder import build_model
from moue.model.init import init_by_global_key
from moue.model.megatron_config import transformer_config
from moue.model.topology import Topology
from parallel.capability import Plan
from parallel.layout import ParallelLayout


def build_chunk(model: ModelConfig, moe: MoEConfig, train: TrainConfig, topology: Topology | None,
                layout: ParallelLayout, plan: Plan, device: torch.device,
                pg: ProcessGroupCollection, *, initialise: bool = True,
                build: Callable | None = None) -> torch.nn.Module:
    """This rank's model chunk on ``device`` (``topology``: the run's, None for the dense
    model). ``build(megatron_config)`` replaces moue's model (the Trainer's hook);
    ``initialise=False`` leaves the weights as allocated, without tensor parallelism: Megatron
    marks a weight as split over TP ranks (``tensor_model_parallel``, read by the gradient norm
    and the optimizer) only while it initialises it (``_initialize_affine_weight_cpu``), so a
    TP>1 chunk built without initialisation would count each rank's shard as a duplicate."""
    if not initialise and (layout.tp > 1 or layout.etp > 1):
        raise ValueError(f"initialise=False is for one-way fills without tensor parallelism; "
                         f"this layout has tp={layout.tp}, etp={layout.etp}")
    config = transformer_config(model, moe, layout, plan, device=device, train=train,
                                initialise=initialise)
    module = build(config) if build else build_model(model, moe, topology, config, pg, plan)
    if initialise:
        init_by_global_key(module, train.seed, module.config.init_method_std, model.num_layers)
    return module.to(device)
