"""Cases: checkpoints imported from Hugging Face give transformers' logits under TP=2 (with
sequence parallelism), PP=2 and EP=2 (tests/test_conversion.py writes them and the reference)."""

import os
from pathlib import Path

import numpy as np
import torch

from moue import checkpoint
from moue.commands.evaluate import token_logits, tokens_config
from moue.training.trainer import Trainer
from parallel.launch import init_model_parallel, seed_everything
from parallel.layout import ParallelLayout
from tests.distributed import Cases

CASES = Cases()
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}


def _max_logit_diff(family: str, layout_name: str) -> float | None:
    """Largest |moue - transformers| logit on the last stage's ranks (None on the others)."""
    base = Path(os.environ["MOUE_CONVERT_DIR"])
    tp, pp, ep = LAYOUTS[layout_name]
    rows = torch.from_numpy(np.load(base / "tokens.npy"))
    path = checkpoint.resolve(base / family / "moue")
    cfg = tokens_config(path, rows, [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                     f"parallel.ep={ep}"])
    layout = ParallelLayout(world_size=torch.distributed.get_world_size(), tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    seed_everything(cfg.train.seed)
    with Trainer(cfg, layout, torch.device("cpu"), datasets=False, training=False) as trainer:
        checkpoint.load_model(path, trainer.model.module, cfg, trainer.pg)
        logits = token_logits(trainer, rows)
    if logits is None:
        return None
    reference = torch.from_numpy(np.load(base / family / "reference_logits.npy"))
    return float((logits - reference).abs().max())


for _family in FAMILIES:
    for _layout in LAYOUTS:
        CASES.add(f"logits[{_family}-{_layout}]",
                  lambda f=_family, lay=_layout: _max_logit_diff(f, lay), nproc=2)
