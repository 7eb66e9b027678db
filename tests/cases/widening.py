"""Cases: a progressively widened checkpoint (with the trajectory state) trains to the same losses
under TP=2 (+SP), PP=2 and EP=2 as in one process (tests/test_widening.py writes it)."""

import json
import os
import shutil
from pathlib import Path

import torch

from moue.config import load_config
from parallel.launch import init_model_parallel
from parallel.layout import ParallelLayout
from tests.cases.reshard import train_stopping_after
from tests.distributed import Cases

CASES = Cases()
LAYOUTS = {"single": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}
STEPS = ["train.steps=4", "train.warmup_steps=1", "train.eval_interval=0"]


def train_widened(source: Path, run: Path, layout_name: str, *extra: str,
                  stop_after: int | None = None) -> dict:
    """Train a copy of the widened checkpoint ``source`` for 4 steps (or stopped by SIGTERM after
    ``stop_after``, as a scheduler stops a job); step -> (loss, grad norm)."""
    tp, pp, ep = LAYOUTS[layout_name]
    world = torch.distributed.get_world_size()
    if torch.distributed.get_rank() == 0 and not (run / "ckpt").exists():
        shutil.copytree(source, run / "ckpt")
    torch.distributed.barrier()
    cfg = load_config(str(run / "ckpt" / "config.yaml"), [
        *STEPS, f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'log'}",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", *extra])
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    train_stopping_after(cfg, layout, torch.device("cpu"), stop_after)
    torch.distributed.barrier()
    rows = [json.loads(x) for x in (run / "log" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


for _name in ("tp2", "pp2", "ep2"):
    CASES.add(f"widened[{_name}]", lambda n=_name: train_widened(
        Path(os.environ["MOUE_WIDEN_DIR"]) / "wide_state",
        Path(os.environ["MOUE_WIDEN_DIR"]) / f"run_{n}", n), nproc=2)
