"""The on-disk format of moue's checkpoints, and the model alone saved and loaded in it.

A checkpoint directory (``checkpoint.dir``)::

    step_0000100/      Megatron-Core dist_checkpointing (torch_dist): the model's shards, under
                       their global keys, and for a training checkpoint the optimizer's;
                       trainer.pt: the run config, and for a training checkpoint the trainer's
                       state (``moue.training.checkpoint``); rng_rank<r>.pt
    latest             the name of the checkpoint to resume from

A *model-only* checkpoint (``save_model``: what ``moue-convert`` and ``moue-export`` write) holds
the model's shards and ``trainer.pt`` with the config and ``model_only: true``; every layout
reads it (Megatron reshards on load), and ``moue-pretrain`` starts a run from it with a fresh
optimizer at step 0. The weights keep the dtype they were saved in (bf16 from a bf16 Hugging
Face model); a model of another dtype loads them converted.

This module knows nothing of optimizers or training state; ``moue.training.checkpoint`` adds
them, the ``latest`` pointer's upkeep and the run lock.
"""

from __future__ import annotations

import queue
import re
import shutil
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from parallel.errors import UserError

# Parameters and buffers every pipeline stage holds a replica of (the pool itself, ExpertPool,
# marks its own): the stage index goes into replica_id[0], as Megatron does for tied embeddings.
PIPELINE_REPLICAS = ("decoder.expert_embedding.", "decoder.pool_balance.")
STEP_DIR = re.compile(r"step_(\d+)")
META = "trainer.pt"
EMBEDDING_KEY = "embedding.word_embeddings.weight"


# Model state added after checkpoints of earlier moue versions were written: loading one without
# it keeps the module's initial value (the EP selection bias: zeros, no bias), so those
# checkpoints still resume and evaluate.
ADDED_LATER = ("decoder.pool_balance.bias_LE",)


def sharded_state(module, pg_collection) -> dict:
    """``module``'s (one rank's unwrapped chunk) sharded state dict, as checkpoints hold it."""
    state = module.sharded_state_dict()
    pp_rank = pg_collection.pp.rank()
    for key, sh in state.items():
        if key.startswith(PIPELINE_REPLICAS) and hasattr(sh, "replica_id"):
            replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
            sh.replica_id = (pp_rank, *replica[1:])
    return state


def state_to_load(module, pg_collection, path: Path) -> tuple[dict, dict]:
    """``sharded_state`` less the ``ADDED_LATER`` keys checkpoint ``path`` lacks, and those keys'
    current values in ``module`` (to load beside what the checkpoint gives)."""
    state = sharded_state(module, pg_collection)
    wanted = [k for k in ADDED_LATER if k in state]
    if not wanted:
        return state, {}
    stored = dist_checkpointing.load_tensors_metadata(str(path))
    absent = [k for k in wanted if k not in stored]
    for key in absent:
        del state[key]
    own = module.state_dict()
    return state, {k: own[k] for k in absent}


def barrier() -> None:
    torch.distributed.barrier()


def step_of(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def step_checkpoints(root: Path) -> list[Path]:
    """The ``step_N`` directories of ``root``, oldest first (by N)."""
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def write_results_in_process() -> None:
    """Megatron's torch_dist writer (``FileSystemWriterAsync``) forks its file writers, then
    hands their results to the finalising step through a queue served by a *spawned*
    multiprocessing Manager (``_results_queue``), built for saves that finish in a background
    process. moue saves synchronously, so write and finalise run in the same process and a
    plain queue does: the Manager cost each process 3.5 s at its first save (it starts a new
    interpreter that imports the main module again; measured on 2 CPU cores, later saves 0.4 s)
    and stayed alive as a child process until the run ended."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def named_by_latest(root: str | Path) -> Path | None:
    """The complete checkpoint ``root/latest`` names (None when there is no ``latest``), read
    without changing anything."""
    root = Path(root)
    marker = root / "latest"
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    path = root / name
    if step_of(path) is None or not (path / META).exists():
        complete = [p.name for p in step_checkpoints(root) if (p / META).exists()]
        raise UserError(f"{marker} names {name!r}, which is not a complete checkpoint; write the "
                        f"name of a complete one into it ({', '.join(complete) or 'none here'}) "
                        "or remove it to start afresh")
    return path


def resolve(load: str | Path, name: str = "--load") -> Path:
    """The checkpoint a path (the option or field ``name``) names: a ``checkpoint.dir`` (its
    ``latest``) or one ``step_N`` directory."""
    load = Path(load)
    if (load / META).exists():
        return load
    if (load / "latest").exists():
        return named_by_latest(load)
    raise UserError(f"{name}={load}: not a checkpoint; give a checkpoint.dir (with a 'latest' "
                    "file) or one of its step_N directories")


def unloadable(path: Path, what: str, err: Exception, every_rank: bool = True) -> UserError:
    previous = [p.name for p in step_checkpoints(path.parent) if p != path][-2:]
    hint = (f"point {path.parent / 'latest'} at an earlier one ({', '.join(previous)})"
            if previous else f"remove {path.parent / 'latest'} to start afresh")
    return UserError(f"checkpoint {path}: cannot load {what} ({type(err).__name__}: "
                     f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); it is "
                     f"damaged or incomplete: {hint}", every_rank=every_rank)


def saved_config(path: Path) -> dict:
    """A checkpoint's ``trainer.pt``: the run config (``RunConfig.to_dict``) under ``config``,
    with the trainer's state or ``model_only``; ``UserError`` when it cannot be read."""
    try:
        meta = torch.load(path / META, weights_only=False)
        meta["config"]
    except Exception as err:  # truncated, garbage or another program's file
        raise unloadable(path, META, err) from err
    return meta


def next_sample(meta: dict) -> int:
    """The first sample of the train split a run continuing checkpoint ``meta``
    (``saved_config``) reads: where its run started (``data.start_sample``) plus what it
    consumed (0 for a model-only checkpoint: an import has consumed nothing of this data)."""
    start = meta["config"].get("data", {}).get("start_sample", 0)
    return start + meta.get("state", {}).get("consumed_samples", 0)


def check_architecture(saved: dict, run_config, path: Path,
                       fix: str = "use the same model/moe settings, or a new checkpoint.dir") -> None:
    """Refuse loading a checkpoint of another model (``RunConfig.architecture``), naming each
    field that differs and ``fix``."""
    current = run_config.architecture()
    # A field added after the checkpoint was written has its default there.
    defaults = type(run_config)().architecture()

    def was(section, key):
        return saved.get(section, {}).get(key, defaults[section][key])

    diffs = [f"{section}.{key}: checkpoint {was(section, key)!r}, now {value!r}"
             for section, values in current.items() for key, value in values.items()
             if was(section, key) != value]
    if diffs:
        raise UserError(f"checkpoint {path} is of another model:\n  " + "\n  ".join(diffs)
                        + "\n" + fix)


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's model weights were saved in (its word embedding's)."""
    try:
        return dist_checkpointing.load_tensors_metadata(str(path))[EMBEDDING_KEY].dtype
    except (Exception, CheckpointException) as err:
        raise unloadable(path, "the shards' metadata", err) from err


def save_model(path: Path, module, run_config, pg_collection) -> Path:
    """Write ``module`` (this rank's chunk) alone as the model-only checkpoint ``path`` (a
    ``step_N`` directory that must not exist yet; every rank calls it)."""
    write_results_in_process()
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    barrier()
    dist_checkpointing.save({"model": sharded_state(module, pg_collection)}, str(path))
    if torch.distributed.get_rank() == 0:
        torch.save({"config": run_config.to_dict(), "model_only": True}, path / META)
    barrier()
    return path


def load_model(path: Path, module, run_config, pg_collection) -> dict:
    """Load the model's weights of checkpoint ``path`` (a training or a model-only one, saved
    under any layout, in any dtype) into ``module``; returns its ``trainer.pt``."""
    meta = saved_config(path)
    check_architecture(meta["config"], run_config, path)
    state, own = state_to_load(module, pg_collection, path)
    try:
        loaded = dist_checkpointing.load({"model": state}, str(path))
    except (Exception, CheckpointException) as err:  # torch's is a BaseException
        raise unloadable(path, "the model's shards", err, every_rank=False) from err
    module.load_state_dict({**loaded["model"], **own})
    return meta


def publish_new(out: Path, staging: Path, module, run_config, pg_collection,
                files: dict[str, str | Path] | None = None) -> Path:
    """The one writer of a new checkpoint directory: ``module`` as the model-only
    ``step_0000000``, ``latest``, ``config.yaml`` (``run_config``: the config to train or
    evaluate it with, also recorded in the checkpoint) and ``files`` (name: text, or a file to
    copy), all in ``staging``, then renamed to ``out``, the only step at which ``out`` appears
    (``moue.outputs.new_output`` gives both paths). Every process of the world calls it; each
    writes its own shards, the first process the rest."""
    first = torch.distributed.get_rank() == 0
    if first:
        staging.mkdir(parents=True)
    step = save_model(staging / "step_0000000", module, run_config, pg_collection)
    if first:
        (staging / "latest").write_text(step.name + "\n")
        (staging / "config.yaml").write_text(yaml.safe_dump(
            run_config.to_dict(), sort_keys=False, default_flow_style=None))
        for name, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, staging / name)
            else:
                (staging / name).write_text(content)
        staging.rename(out)
    barrier()
    return out
