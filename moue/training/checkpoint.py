"""Training checkpoints: the model, the optimizer and the trainer's state, written aside and
published atomically, in the format of ``moue.checkpoint``; and the run lock.

A training checkpoint's ``step_N`` holds the model and the optimizer (torch_dist), ``trainer.pt``
(scheduler, step, samples, config) and ``rng_rank<r>.pt``; ``checkpoint.dir/.lock`` is held by a
live run (see ``run_lock``). A model-only checkpoint (an import, an export) starts a run at step
0 with a fresh optimizer.

A run whose ``checkpoint.dir`` holds no checkpoint yet starts from ``checkpoint.init``'s weights
when it is set (``initial_checkpoint``), and with ``checkpoint.init_optimizer`` from its Adam
state too (moments and Adam's step count): a new run, whose own step, schedule, data position
and RNG start anew, as a continued pretraining or a new phase of one does.

A checkpoint is written into ``.tmp_step_...`` and renamed when every rank has finished; only
then is ``latest`` replaced (write-aside, then ``os.replace``). A process killed mid-save leaves
``latest`` pointing at the previous complete checkpoint.

Decisions:
- ``latest`` is authoritative. A ``step_N`` newer than it exists only if a run was killed
  between renaming ``step_N`` and updating ``latest`` (or if a user pointed ``latest`` back to
  roll a run back). At start-up such a checkpoint is renamed ``step_N.abandoned`` (kept, never
  resumed from, never pruned), so the run's own later saves cannot be confused with it.
- Pruning keeps the ``keep_last`` newest checkpoints *up to the one just saved* and never
  deletes the one ``latest`` names.
- The optimizer is saved in the distributed optimizer's ``fully_reshardable`` format without
  chained-optimizer prefixes, so a checkpoint loads under another (tp, pp, ep, dp) layout, also
  when the optimizer is split differently (ep=1: one optimizer; ep>1: dense and expert parts).
- A checkpoint loads into a run with the same architecture (``RunConfig.architecture``): the
  balance, dispatcher and learning-rate settings may change on resume.

- Saves are synchronous, and the writer's results come back through an in-process queue
  (``moue.checkpoint.write_results_in_process``), not a spawned multiprocessing server.

Process groups are passed in (Megatron's ``ProcessGroupCollection``); the barriers span the world
(every rank saves).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from moue.checkpoint import (
    META,
    barrier,
    check_architecture,
    load_model,
    named_by_latest,
    next_sample,
    resolve,
    saved_config,
    sharded_state,
    state_to_load,
    step_checkpoints,
    step_of,
    unloadable,
    write_results_in_process,
)
from parallel.compat import load_distributed_optimizer_state
from parallel.errors import UserError

# fully_reshardable: the optimizer state of each parameter under the parameter's global key, with
# no "chained_<i>." prefix, so it loads whether the optimizer is split into dense and expert
# parts (ep>1) or not (ep=1).
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def save_checkpoint(root: str | Path, *, step: int, model, optimizer, extra_state: dict,
                    run_config, pg_collection, keep_last: int) -> Path:
    """Save ``model`` (this rank's unwrapped chunk), ``optimizer`` and ``extra_state`` (the
    trainer's scheduler and counters) as ``root/step_<step>``, then point ``latest`` at it."""
    write_results_in_process()
    root = Path(root)
    name = f"step_{step:07d}"
    tmp, final = root / f".tmp_{name}", root / name
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state = sharded_state(model, pg_collection)
    dist_checkpointing.save({
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=SHARDING),
    }, str(tmp))
    torch.save({"cpu": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({**extra_state, "config": run_config.to_dict()}, tmp / META)
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = root / ".latest.tmp"
        marker.write_text(name + "\n")
        os.replace(marker, root / "latest")  # only now does the new checkpoint count
        prune(root, step, keep_last)
    barrier()
    return final


def prune(root: Path, saved_step: int, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints up to ``saved_step`` (the one just
    saved, which ``latest`` names and which is never deleted); returns what was deleted."""
    older = [p for p in step_checkpoints(root) if step_of(p) < saved_step]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def set_aside_newer(root: Path, latest: Path) -> list[Path]:
    """Rename checkpoints newer than ``latest`` to ``*.abandoned`` (module docstring); returns
    their new paths."""
    moved = []
    for newer in step_checkpoints(root):
        if step_of(newer) > step_of(latest):
            target, n = newer.with_name(newer.name + ".abandoned"), 1
            while target.exists():  # an earlier one of the same step stays too
                n += 1
                target = newer.with_name(f"{newer.name}.abandoned.{n}")
            newer.rename(target)
            print(f"moue: {newer} is newer than {root / 'latest'} ({latest.name}); kept as "
                  f"{target.name}, resuming from {latest.name}", file=sys.stderr)
            moved.append(target)
    return moved


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names (None when there is none yet). Checkpoints newer
    than it are renamed ``*.abandoned`` (see the module docstring). Rank 0 renames; call it on
    every rank, under ``run_lock`` (which also refuses a ``root`` that is not a directory)."""
    path = named_by_latest(root)
    if path is None:
        return None
    if torch.distributed.get_rank() == 0:
        set_aside_newer(Path(root), path)
    barrier()
    return path


def initial_checkpoint(run_config) -> Path | None:
    """The checkpoint ``checkpoint.init`` names, checked before anything is built: it is a
    checkpoint, of this model, and holds an optimizer state if ``init_optimizer`` asks for one.
    None without ``init``, or when ``checkpoint.dir`` has a checkpoint (the run resumes that).
    Reads only; every rank may call it."""
    ckpt = run_config.checkpoint
    if not ckpt.init or (ckpt.dir and named_by_latest(ckpt.dir)):
        return None
    path = resolve(ckpt.init, "checkpoint.init")
    meta = saved_config(path)
    if ckpt.init_optimizer and meta.get("model_only"):
        raise UserError(f"checkpoint.init={ckpt.init}: {path} is a model-only checkpoint (an "
                        "import or an export) and holds no optimizer state; set "
                        "checkpoint.init_optimizer=false, or point checkpoint.init at a training "
                        "checkpoint")
    check_architecture(meta["config"], run_config, path,
                       fix="use the model/moe settings it was trained with (its trainer.pt "
                           "records them), or another checkpoint.init")
    return path


def describe_start(path: Path, run_config) -> str:
    """The line a run started from ``checkpoint.init`` prints: what it took, and where its data
    goes on from when ``data.start_sample`` does not already say."""
    read_up_to = next_sample(saved_config(path))
    hint = ("" if read_up_to in (0, run_config.data.start_sample) else
            f"; the runs behind it read the train split up to sample {read_up_to} "
            f"(data.start_sample={read_up_to} goes on from there)")
    taken = ("weights and optimizer state" if run_config.checkpoint.init_optimizer
             else "weights")
    return f"moue: starting at step 0 from the {taken} of {path}{hint}"


def load_checkpoint(path: Path, *, model, optimizer, run_config, pg_collection,
                    start: bool = False) -> dict | None:
    """Restore ``model`` and ``optimizer`` from ``path`` (saved under any layout) and this rank's
    RNG; returns the trainer's extra state (``save_checkpoint``'s ``extra_state``), or None for
    a model-only checkpoint, whose weights start a fresh optimizer (its step 0).

    ``start``: ``path`` is ``checkpoint.init``, which starts a new run: its weights, and with
    ``checkpoint.init_optimizer`` its optimizer state; its step, schedule and RNG are not taken
    (returns None)."""
    meta = saved_config(path)
    if meta.get("model_only") or (start and not run_config.checkpoint.init_optimizer):
        load_model(path, model, run_config, pg_collection)
        optimizer.reload_model_params()  # the fp32 main copies of bf16 weights
        return None
    check_architecture(meta["config"], run_config, path)
    model_state, own = state_to_load(model, pg_collection, path)
    init_optimizer_state(optimizer)
    wanted = {"model": model_state,
              "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True,
                                                        metadata=SHARDING)}
    try:
        loaded = dist_checkpointing.load(wanted, str(path))
    except (Exception, CheckpointException) as err:  # torch's is a BaseException
        raise unloadable(path, "the model and optimizer shards", err, every_rank=False) from err
    model.load_state_dict({**loaded["model"], **own})
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for index, part in enumerate(parts):
        load_distributed_optimizer_state(part, _part_state(loaded["optimizer"], index, part,
                                                           chained=len(parts) > 1))
    if len(parts) > 1:
        optimizer._synchronize_steps()
    if start:
        return None
    rng = path / f"rng_rank{torch.distributed.get_rank()}.pt"
    if rng.exists():  # absent when the checkpoint was saved with fewer processes
        try:
            torch.set_rng_state(torch.load(rng)["cpu"])
        except Exception as err:
            raise unloadable(path, rng.name, err, every_rank=False) from err
    return {k: v for k, v in meta.items() if k != "config"}


# --- One live run per directory ------------------------------------------------------------


@contextlib.contextmanager
def run_lock(checkpoint_dir: str | None, log_dir: str | None):
    """Hold an exclusive lock on the run's checkpoint and log directories (``<dir>/.lock``) for
    its lifetime, or refuse to start, naming the live run that holds one. Global rank 0 takes
    the locks and tells the other ranks. The operating system drops a lock when its process dies
    (``flock``), so a killed run never leaves one stuck. On a file system without ``flock`` the
    run goes on without a lock."""
    held, refusal = [], None
    if torch.distributed.get_rank() == 0:
        wanted = {"checkpoint.dir": checkpoint_dir, "logging.dir": log_dir}
        seen = set()
        for field, directory in wanted.items():
            if directory and Path(directory).resolve() not in seen:
                seen.add(Path(directory).resolve())
                refusal = _take_lock(field, Path(directory), held)
                if refusal:
                    break
    shared = [refusal]
    torch.distributed.broadcast_object_list(shared, src=0)
    try:
        if shared[0]:
            raise UserError(shared[0])
        yield
    finally:
        for f in held:
            f.close()


def _take_lock(field: str, directory: Path, held: list) -> str | None:
    """Lock ``directory`` (appending the open lock file to ``held``), or the refusal message."""
    if directory.exists() and not directory.is_dir():
        return (f"{field}={directory}: is a file, not a directory; give a directory path (it is "
                "created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / ".lock", "a+")
    except OSError as err:
        return f"{field}={directory}: cannot write there ({err.strerror}); choose a writable directory"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return (f"{field}={directory} is in use by a live run ({holder}); wait for it to finish "
                f"or stop it, or give this run another {field}")
    except OSError:  # no flock on this file system: go on unlocked
        held.append(f)
        return None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": " ".join(sys.argv)[:300]}))
    f.flush()
    held.append(f)
    return None


def _part_state(loaded: dict, index: int, part, chained: bool) -> dict:
    """The loaded state of one part of a (possibly chained) distributed optimizer.

    The per-parameter tensors were placed in the structure this run asked for; the param groups
    come back in the structure the checkpoint was *saved* with, which differs when the optimizer
    is split differently (ep=1: one optimizer; ep>1: dense and expert parts). Each part keeps its
    own param groups (lr and weight decay are set by the schedule every step; betas, eps from the
    config) and takes Adam's step from the checkpoint.
    """
    # The per-parameter tensors ("param_state") follow this run's structure: under part
    # ``index`` when this run's optimizer is chained, at the top when it is one optimizer (even
    # when the checkpoint's was chained and so has parts 0, 1 holding only param groups).
    state = loaded[index] if chained else loaded
    saved_groups = _saved_param_groups(loaded)
    groups = part.state_dict()["optimizer"]["param_groups"]
    steps = {g["step"] for g in saved_groups if "step" in g}
    if len(steps) > 1:
        raise ValueError(f"checkpoint optimizer parts disagree on the step: {sorted(steps)}")
    for group in groups:
        if steps:
            group["step"] = next(iter(steps))
    saved_common = loaded if "optimizer" in loaded else next(
        (v for k, v in loaded.items() if isinstance(k, int)), {})
    common = {k: v for k, v in saved_common.items()
              if not isinstance(k, int) and k not in ("param_state", "optimizer")}
    return {**common, **state,
            "optimizer": {**state.get("optimizer", {}), "param_groups": groups}}


def _saved_param_groups(loaded: dict) -> list:
    if "optimizer" in loaded and "param_groups" in loaded["optimizer"]:
        return loaded["optimizer"]["param_groups"]
    return [g for key, part in loaded.items() if isinstance(key, int)
            for g in part.get("optimizer", {}).get("param_groups", [])]


def init_optimizer_state(optimizer) -> None:
    """Create Adam's (lazy) state so a checkpoint can be loaded into it: one step on zero
    gradients with lr and weight decay 0, which leaves every weight unchanged.

    Megatron-Core 0.16 does this only for its FSDP format; without it, loading (or saving) the
    distributed optimizer's state fails (``assert len(steps) == 1``, distrib_optimizer.py)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = part.optimizer.param_groups
        saved = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        part._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd
