"""Cases: moue-pretrain's training loop (moue.training) under parallel layouts."""

import json
import os
import tempfile
from functools import partial
from pathlib import Path

import torch

from moue.config import load_config
from moue.training import train
from parallel.launch import init_model_parallel
from parallel.layout import ParallelLayout
from tests.distributed import Cases

CASES = Cases()
CONFIG = "examples/configs/tiny_cpu.yaml"
SHORT = ["train.steps=3", "train.warmup_steps=1", "train.eval_interval=3", "train.eval_iters=1",
         "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=64",
         "logging.interval=1"]
LAYOUTS = {"single": (1, 1, 1), "tp2": (2, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1)}


def _train(name: str) -> list | None:
    """Train 3 steps; the logging rank returns the rows of metrics.jsonl, the others None."""
    tp, pp, ep = LAYOUTS[name]
    world = torch.distributed.get_world_size()
    out = Path(tempfile.gettempdir()) / f"moue-train-{os.environ['MASTER_PORT']}" / name
    cfg = load_config(CONFIG, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.ep={ep}", f"logging.dir={out}"])
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    train(cfg, layout, torch.device("cpu"))
    torch.distributed.barrier()  # the logging rank has closed the file
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


CASES.add("train[single]", partial(_train, "single"), nproc=1)
for _name in ("tp2", "ep2", "pp2"):
    CASES.add(f"train[{_name}]", partial(_train, _name), nproc=2)
