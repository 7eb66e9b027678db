"""The model alone on CPU processes, as the conversion commands and ``moue-export`` build it: no
optimizer, no data, the weights once in the dtype they are read or written in.

One process holds the whole model. Hugging Face import and export also run under torchrun
(``spread``): the pool's experts are split over the N processes (expert parallelism, EP = N;
pool expert ``e`` on rank ``e mod N``) and every process holds the rest of the model, so each
reads and writes its own experts only. Tensor and pipeline parallelism are not used here: the
experts are most of an MoE's bytes, and a checkpoint written under one layout loads under any.

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
# state_dict keys are one per pool expert, which the conversions name), no data. Spread over N
# processes, parallel.ep is N.
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


def standalone_config(base: dict, dtype: torch.dtype, overrides: list[str] = (),
                       spread: bool = False) -> RunConfig:
    """``base`` (a config as a dict) as one CPU process builds it, its weights in ``dtype``;
    ``spread``: its experts split over the processes a launcher started (``processes``)."""
    cfg = load_config(None, [*ONE_CPU_PROCESS, f"train.precision={precision(dtype)}",
                             *overrides], base=base)
    world = processes() if spread else 1
    if world == 1:
        return cfg
    experts = cfg.moe.num_experts
    if cfg.model.dense:
        raise UserError(f"{world} processes: the model is dense (no experts to spread over "
                        "them); run it as one process")
    if experts % world:
        raise UserError(f"{world} processes: the model has {experts} experts in its pool, which "
                        "moue-convert spreads over its processes (one share each); launch a "
                        f"number of processes that divides {experts}, or run it as one process")
    # batches are not drawn here: one sample per process, and no elastic micro-batches, passes
    # the run's check on any number of processes
    return load_config(None, [f"parallel.ep={world}", "train.micro_batch_size=1",
                              f"train.global_batch_size={world}", "elastic.enabled=false"],
                       base=cfg.to_dict())


def processes() -> int:
    """How many processes the launcher started (1 without one)."""
    return launch.read_launch_env().world_size


def require_one_process(command: str) -> None:
    """Refuse a launch of more than one process (before any work: each would convert alone)."""
    if processes() != 1:
        raise UserError(f"{command} runs as one process (it holds the whole model); run it "
                        "without torchrun")


def new_output(output: str, flag: str, command: str, spread: bool = False) -> tuple[Path, Path]:
    """The output path and its hidden staging twin (``moue.outputs``), checked before any
    work, for ``command``, which runs as one process unless ``spread``. Every process checks;
    each reaches the world's start-up, where all wait for all, before any writes."""
    paths = outputs.new_output(output, flag)
    if not spread:
        require_one_process(command)
    return paths


@contextlib.contextmanager
def standalone_world(cfg: RunConfig, command: str):
    """Process groups of a world of CPU processes for the block (``cfg``'s seed); yields them.
    One process unless ``cfg`` spreads the experts (``standalone_config(spread=True)``);
    ``command`` names the command when a launcher started more processes than ``cfg`` has."""
    world = processes()
    if cfg.parallel.ep != world:
        require_one_process(command)
    launch.init_distributed(check_run(cfg, world), device="cpu", env=launch.read_launch_env())
    try:
        launch.seed_everything(cfg.train.seed)
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        launch.shutdown()


@contextlib.contextmanager
def together():
    """The block on every process of the world, ending together: where some processes meet
    bad input (a ``UserError``: an expert's tensor only its process reads), each of them raises
    its own at the block's end and the others one that names the first of them, so every
    process stops with its message instead of waiting for the failed ones at a collective."""
    error = None
    try:
        yield
    except UserError as err:
        error = err
    world = torch.distributed.get_world_size()
    if world > 1:
        met = [None] * world
        torch.distributed.all_gather_object(met, error is not None)
        if error is None and any(met):
            raise UserError(f"stopped: process {met.index(True)} met bad input (its message "
                            "is above or beside this one)")
    if error is not None:
        raise error


def new_chunk(cfg: RunConfig, pg, initialise: bool = True) -> torch.nn.Module:
    """``cfg``'s model on this CPU process (``initialise=False``: weights left to fill)."""
    return build_chunk(cfg.model, cfg.moe, cfg.train, cfg.topology(),
                       check_run(cfg, cfg.parallel.ep), plan_run(cfg), torch.device("cpu"), pg,
                       initialise=initialise)


POOL_EXPERTS = "decoder.expert_pool.local_experts."


def one_process_state(module: torch.nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state dict under the names one process gives it: its pool experts by pool
    id (``decoder.expert_pool.local_experts.<e>``; under EP a rank holds ``e = i*EP + r``).
    Tensors share the module's memory (``keep_vars``: the parameters themselves)."""
    pool = getattr(module.decoder, "expert_pool", None)
    ids = pool.pool_ids() if pool is not None else []
    state = {}
    for key, value in module.state_dict(keep_vars=keep_vars).items():
        if key.startswith(POOL_EXPERTS):
            local, rest = key[len(POOL_EXPERTS):].split(".", 1)
            key = f"{POOL_EXPERTS}{ids[int(local)]}.{rest}"
        state[key] = value
    return state


def loaded_chunk(path: Path, cfg: RunConfig, pg) -> torch.nn.Module:
    """Checkpoint ``path``'s model (``cfg``: its config, in the one-process form)."""
    module = new_chunk(cfg, pg, initialise=False)
    checkpoint.load_model(path, module, cfg, pg)
    return module
