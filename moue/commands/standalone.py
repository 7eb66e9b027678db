"""The model alone in a world of one CPU process, as the conversion commands and ``moue-export``
build it: no optimizer, no data, the weights once in the dtype they are read or written in.

A checkpoint's weights keep their dtype through these commands (``precision``): a bf16 run's
export is bf16, an fp32 one's fp32; ``--dtype`` chooses another.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from moue import checkpoint, outputs
from moue.config import RunConfig, load_config
from moue.model.chunk import build_chunk
from moue.run_check import check_run, plan_run
from parallel import launch
from parallel.errors import UserError

# A run's config as one CPU process builds it: no parallelism, the sequential pool (its
# state_dict keys are one per pool expert, which the conversions name), no data.
ONE_CPU_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.etp=null",
                   "data.mock=true", "data.path=null", "data.blend=null", "train.eval_interval=0",
                   "model.transformer_impl=local", "moe.expert_impl=sequential",
                   "train.recompute=none", "train.recompute_modules=null", "checkpoint.dir=null"]
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the commands' --dtype


def precision(dtype: torch.dtype) -> str:
    """``train.precision`` whose weights are ``dtype`` (fp16, which moue does not train in,
    is widened to fp32, losslessly)."""
    return PRECISIONS.get(dtype, "fp32")


def one_process_config(base: dict, dtype: torch.dtype, overrides: list[str] = ()) -> RunConfig:
    """``base`` (a config as a dict) as one CPU process builds it, its weights in ``dtype``."""
    return load_config(None, [*ONE_CPU_PROCESS, f"train.precision={precision(dtype)}",
                              *overrides], base=base)


def require_one_process(command: str) -> None:
    """Refuse a launch of more than one process (before any work: each would convert alone)."""
    if launch.read_launch_env().world_size != 1:
        raise UserError(f"{command} runs as one process (it holds the whole model); run it "
                        "without torchrun")


def new_output(output: str, flag: str, command: str) -> tuple[Path, Path]:
    """The output path and its hidden staging twin (``moue.outputs``), checked before any
    work, for ``command``, which runs as one process."""
    paths = outputs.new_output(output, flag)
    require_one_process(command)
    return paths


@contextlib.contextmanager
def one_process(cfg: RunConfig, command: str):
    """Process groups of a world of one CPU process for the block (``cfg``'s seed); yields
    them. ``command`` names the command when a launcher started more processes."""
    require_one_process(command)
    launch.init_distributed(check_run(cfg, 1), device="cpu", env=launch.read_launch_env())
    try:
        launch.seed_everything(cfg.train.seed)
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        launch.shutdown()


def new_chunk(cfg: RunConfig, pg, initialise: bool = True) -> torch.nn.Module:
    """``cfg``'s model on this one CPU process (``initialise=False``: weights left to fill)."""
    return build_chunk(cfg.model, cfg.moe, cfg.train, cfg.topology(), check_run(cfg, 1),
                       plan_run(cfg), torch.device("cpu"), pg, initialise=initialise)


def loaded_chunk(path: Path, cfg: RunConfig, pg) -> torch.nn.Module:
    """Checkpoint ``path``'s model (``cfg``: its config, in the one-process form)."""
    module = new_chunk(cfg, pg, initialise=False)
    checkpoint.load_model(path, module, cfg, pg)
    return module
