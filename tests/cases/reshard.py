"""Cases: a checkpoint saved under PP=2 loads under EP=2 and in one process (test_training.py)."""

import json
import os
import signal
from functools import partial
from pathlib import Path

import torch

import moue.training.trainer as training
from moue.config import load_config
from parallel.launch import init_model_parallel
from parallel.layout import ParallelLayout
from tests.distributed import Cases

CASES = Cases()
CONFIG = "examples/configs/tiny_cpu.yaml"
SHORT = ["moe.ep_balance_groups=2", "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0",
         "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=64"]
LAYOUTS = {"pp2": (1, 2, 1), "ep2": (1, 1, 2), "single": (1, 1, 1)}


def train_stopping_after(cfg, layout, device, stop_after: int | None):
    """``moue.training.trainer.train``, sent SIGTERM after step ``stop_after`` (None: never) as
    a scheduler would stop it: the run saves a checkpoint and stops. Returns the Trainer."""
    original = training.Trainer.train_step

    def step(trainer):
        metrics = original(trainer)
        if stop_after is not None and trainer.state.step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    training.Trainer.train_step = step
    try:
        return training.train(cfg, layout, device)
    finally:
        training.Trainer.train_step = original


def _run(layout_name: str, tag: str, stop_after: int | None) -> dict:
    """Train (resuming from the shared checkpoint when there is one); steps -> losses."""
    base = Path(os.environ["MOUE_RESHARD_DIR"])
    tp, pp, ep = LAYOUTS[layout_name]
    world = torch.distributed.get_world_size()
    cfg = load_config(CONFIG, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.ep={ep}", f"logging.dir={base / tag}",
                               f"checkpoint.dir={base / tag / 'ckpt'}"])
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    train_stopping_after(cfg, layout, torch.device("cpu"), stop_after)
    torch.distributed.barrier()
    rows = [json.loads(x) for x in (base / tag / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _load_saved_pp2(layout_name: str) -> dict:
    """Copy the PP=2 checkpoint (step 2) into a fresh directory and resume under a layout."""
    import shutil

    base = Path(os.environ["MOUE_RESHARD_DIR"])
    target = base / f"from_pp2_{layout_name}" / "ckpt"
    if torch.distributed.get_rank() == 0:
        shutil.copytree(base / "pp2" / "ckpt" / "step_0000002", target / "step_0000002",
                        dirs_exist_ok=True)
        (target / "latest").write_text("step_0000002\n")
    torch.distributed.barrier()
    return _run(layout_name, f"from_pp2_{layout_name}", None)


CASES.add("save[pp2]", partial(_run, "pp2", "pp2", 2), nproc=2)
CASES.add("continue[pp2]", partial(_run, "pp2", "pp2", None), nproc=2)
CASES.add("load[ep2]", partial(_load_saved_pp2, "ep2"), nproc=2)
CASES.add("load[single]", partial(_load_saved_pp2, "single"), nproc=1)
