"""Checkpoints: Megatron-Core ``dist_checkpointing``, written aside and published atomically.

Layout of ``checkpoint.dir``::

    step_0000100/      model + optimizer (torch_dist), trainer.pt (scheduler, step, samples,
                       config), rng_rank<r>.pt
    latest             the name of the newest *complete* checkpoint

A checkpoint is written into ``.tmp_step_...`` and renamed when every rank has finished; only
then is ``latest`` replaced (write-aside, then ``os.replace``). A process killed mid-save leaves
``latest`` pointing at the previous complete checkpoint. The optimizer is saved in the
distributed optimizer's ``fully_reshardable`` format without chained-optimizer prefixes, so a
checkpoint loads under another (tp, pp, ep, dp) layout, also when the optimizer is split
differently (ep=1: one optimizer; ep>1: dense and expert parts).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from parallel.compat import load_distributed_optimizer_state

# fully_reshardable: the optimizer state of each parameter under the parameter's global key, with
# no "chained_<i>." prefix, so it loads whether the optimizer is split into dense and expert
# parts (ep>1) or not (ep=1).
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# Parameters and buffers every pipeline stage holds a replica of (the pool itself, ExpertPool,
# marks its own): the stage index goes into replica_id[0], as Megatron does for tied embeddings.
PIPELINE_REPLICAS = ("decoder.expert_embedding.", "decoder.pool_balance.")
MODEL_SECTIONS = ("model", "moe")


def _model_state(trainer) -> dict:
    state = trainer.model.module.sharded_state_dict()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for key, sh in state.items():
        if key.startswith(PIPELINE_REPLICAS) and hasattr(sh, "replica_id"):
            replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
            sh.replica_id = (pp_rank, *replica[1:])
    return state


def _barrier():
    torch.distributed.barrier()


def save_checkpoint(trainer, root: str | Path, keep_last: int) -> Path:
    root = Path(root)
    name = f"step_{trainer.state.step:07d}"
    tmp, final = root / f".tmp_{name}", root / name
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state = _model_state(trainer)
    dist_checkpointing.save({
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(model_state, metadata=SHARDING),
    }, str(tmp))
    torch.save({"cpu": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({"scheduler": trainer.scheduler.state_dict(), "state": asdict(trainer.state),
                    "config": trainer.cfg.to_dict(), "layout": trainer.layout.describe()},
                   tmp / "trainer.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = root / ".latest.tmp"
        marker.write_text(name + "\n")
        os.replace(marker, root / "latest")  # only now does the new checkpoint count
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    marker = Path(root) / "latest"
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise FileNotFoundError(f"{marker} names {path}, which is not a complete checkpoint; "
                                "point it at a complete step_* directory or remove it")
    return path


def _check_config(saved: dict, cfg, path: Path) -> None:
    current = cfg.to_dict()
    diffs = [f"{section}.{key}: checkpoint {saved[section].get(key)!r}, now {value!r}"
             for section in MODEL_SECTIONS for key, value in current[section].items()
             if saved.get(section, {}).get(key) != value]
    if diffs:
        raise ValueError(f"checkpoint {path} is of another model:\n  " + "\n  ".join(diffs)
                         + "\nuse the same model/moe settings, or a new checkpoint.dir")


def load_checkpoint(trainer, path: Path) -> None:
    """Restore model, optimizer, scheduler, data position and RNG from ``path`` (any layout)."""
    meta = torch.load(path / "trainer.pt", weights_only=False)
    _check_config(meta["config"], trainer.cfg, path)
    _init_optimizer_state(trainer.optimizer)
    model_state = _model_state(trainer)
    loaded = dist_checkpointing.load({
        "model": model_state,
        "optimizer": trainer.optimizer.sharded_state_dict(model_state, is_loading=True,
                                                          metadata=SHARDING),
    }, str(path))
    trainer.model.module.load_state_dict(loaded["model"])
    parts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    for index, part in enumerate(parts):
        load_distributed_optimizer_state(part, _part_state(loaded["optimizer"], index, part))
    if len(parts) > 1:
        trainer.optimizer._synchronize_steps()
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.state = type(trainer.state)(**meta["state"])
    rng = path / f"rng_rank{torch.distributed.get_rank()}.pt"
    if rng.exists():  # absent when the checkpoint was saved with fewer processes
        torch.set_rng_state(torch.load(rng)["cpu"])


def _part_state(loaded: dict, index: int, part) -> dict:
    """The loaded state of one part of a (possibly chained) distributed optimizer.

    The per-parameter tensors were placed in the structure this run asked for; the param groups
    come back in the structure the checkpoint was *saved* with, which differs when the optimizer
    is split differently (ep=1: one optimizer; ep>1: dense and expert parts). Each part keeps its
    own param groups (lr and weight decay are set by the schedule every step; betas, eps from the
    config) and takes Adam's step from the checkpoint.
    """
    state = loaded.get(index, loaded)
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


def _init_optimizer_state(optimizer) -> None:
    """Create Adam's (lazy) state so a checkpoint can be loaded into it: one step on zero
    gradients with lr and weight decay 0, which leaves every weight unchanged.

    Megatron-Core 0.16 does this only for its FSDP format; without it, loading the distributed
    optimizer's state fails (``assert len(steps) == 1``, distrib_optimizer.py)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = part.optimizer.param_groups
        saved = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        part._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd
