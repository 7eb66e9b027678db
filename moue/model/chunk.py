"""A model chunk on its own: built from a run's config without an optimizer or data, for the
commands that only need weights (conversion, export) and for the Trainer, which adds the rest.

``build_chunk`` gives this rank's chunk (``moue.model.builder``) of a validated layout and plan,
initialised from global keys (``moue.model.init``: the same weights under every layout), or left
uninitialised when a checkpoint or a conversion supplies every weight (no time spent drawing
numbers that are overwritten, no fp32 master copies of each matrix). ``one_process`` runs a
block as a world of one CPU process, the way the conversion commands run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from moue.config import RunConfig
from moue.model.builder import build_model
from moue.model.init import init_by_global_key
from moue.model.megatron_config import transformer_config
from parallel import launch
from parallel.capability import Plan
from parallel.layout import ParallelLayout

# A run's config as one CPU process builds it for conversion or export: no parallelism, the
# sequential pool (its state_dict keys are one per pool expert), no data, fp32 unless a dtype is
# asked for (``precision``).
ONE_CPU_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.etp=null",
                   "data.mock=true", "data.path=null", "data.blend=null", "train.eval_interval=0",
                   "model.transformer_impl=local", "moe.expert_impl=sequential",
                   "train.precision=fp32", "train.recompute=none",
                   "train.recompute_modules=null"]
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the conversion commands' --dtype


def precision(dtype: torch.dtype) -> str:
    """``train.precision`` whose weights are ``dtype`` (fp16, which moue does not train in,
    is widened to fp32, losslessly)."""
    return PRECISIONS.get(dtype, "fp32")


def build_chunk(cfg: RunConfig, layout: ParallelLayout, plan: Plan, device: torch.device,
                pg: ProcessGroupCollection, *, initialise: bool = True,
                build: Callable | None = None) -> torch.nn.Module:
    """This rank's model chunk on ``device``. ``build(megatron_config)`` replaces moue's model
    (the Trainer's hook); ``initialise=False`` leaves the weights as allocated."""
    config = transformer_config(cfg.model, cfg.moe, layout, plan, device=device, train=cfg.train,
                                initialise=initialise)
    module = (build(config) if build else
              build_model(cfg.model, cfg.moe, cfg.topology(), config, pg, plan))
    if initialise:
        init_by_global_key(module, cfg.train.seed, module.config.init_method_std,
                           cfg.model.num_layers)
    return module.to(device)


@contextlib.contextmanager
def one_process(layout: ParallelLayout, seed: int):
    """Process groups of a world of one CPU process for the block; yields them."""
    launch.init_distributed(layout, device="cpu", env=launch.read_launch_env())
    try:
        launch.seed_everything(seed)
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        launch.shutdown()
