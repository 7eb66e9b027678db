"""``moue-eval``: held-out loss and perplexity of a checkpoint, for the full model, elastic
sub-models or the whole family.

The checkpoint's own config (``trainer.pt``) is used, with the usual dotted overrides on top
(e.g. ``train.eval_iters=8``, ``data.path=...``, ``parallel.ep=2``; the layout is the overrides'
alone, data parallel over every process by default); it runs under torchrun on any layout,
whatever layout the checkpoint was saved under (Megatron's distributed checkpoints
reshard on load). The loss is the mean over ``train.eval_iters`` global batches of the
validation split, the batches ``moue-pretrain`` evaluates on.

FLOPs per token in the table are forward-pass FLOPs (a third of ``moue.model.size``'s training
figure): what serving a token costs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moue.config import RunConfig, load_config
from moue.elastic.submodel import SubModel, family, full, parse
from moue.model.size import sizes
from moue.run_check import check_run
from moue.training import checkpoint
from parallel import launch
from parallel.errors import UserError


def checkpoint_config(path: Path, overrides: list[str]) -> RunConfig:
    """The config a checkpoint was saved with, overridden. The layout is not the saved one but
    the overrides' (default: data parallel over every process), so that a checkpoint saved on
    many GPUs evaluates on one process as it is. Never resumes nor writes into the checkpoint's
    directory (``checkpoint.dir`` is unset)."""
    saved = {k: v for k, v in checkpoint.saved_config(path)["config"].items() if k != "parallel"}
    return load_config(None, [*overrides, "checkpoint.dir=null"], base=saved)


def submodels_to_evaluate(cfg: RunConfig, texts: list[str], whole_family: bool) -> list[SubModel]:
    choices = cfg.elastic_choices()
    if choices is None:
        if texts or whole_family:
            raise UserError("this checkpoint is of the dense model (model.moe_layer_freq=0): it "
                            "has no sub-models; leave out --submodel and --family")
        return [None]
    subs = family(choices) if whole_family else [full(choices)]
    subs += [parse(text, choices, cfg.topology().window) for text in texts]
    return list(dict.fromkeys(subs))  # in order, once each


def evaluate(load: str, texts: list[str], whole_family: bool, overrides: list[str]) -> list[dict]:
    """Rows of the table (the same on every rank); starts and stops the process groups."""
    from moue.training.trainer import Trainer

    path = checkpoint.resolve(load)
    cfg = checkpoint_config(path, overrides)
    subs = submodels_to_evaluate(cfg, texts, whole_family)
    env = launch.read_launch_env()
    layout = check_run(cfg, env.world_size)
    launch.init_distributed(layout, device="auto", env=env)
    try:
        launch.seed_everything(cfg.train.seed)
        trainer = Trainer(cfg, layout, launch.resolve_device("auto"))
        checkpoint.load_checkpoint(path, model=trainer.model.module, optimizer=None,
                                   run_config=cfg, pg_collection=trainer.pg)
        rows = []
        for sub in subs:
            trainer.use_submodel(sub)
            loss = trainer.evaluate()
            label = sub.label if sub is not None else "dense"
            rows.append({"submodel": label,
                         "layers": len(sub.layers) if sub else cfg.model.num_layers,
                         "experts": len(sub.experts) if sub else 0, "topk": sub.topk if sub else 0,
                         **sizes(cfg.model, cfg.moe, cfg.topology(), sub), "loss": loss, "ppl": math.exp(min(loss, 50.0))})
        return rows
    finally:
        launch.shutdown()


def markdown(rows: list[dict]) -> str:
    """The family table (parameters in millions, FLOPs in MFLOP)."""
    head = ("| sub-model | layers | experts | k | params total (M) | params active (M) "
            "| fwd MFLOP/token | loss | ppl |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['submodel']} | {r['layers']} | {r['experts']} | {r['topk']} "
                     f"| {r['params_total'] / 1e6:.3f} | {r['params_active'] / 1e6:.3f} "
                     f"| {r['fwd_flops_per_token'] / 1e6:.2f} | {r['loss']:.4f} "
                     f"| {r['ppl']:.2f} |")
    return "\n".join(lines)


def write_json(rows: list[dict], path: str, load: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"checkpoint": str(load), "rows": rows}, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"--json {path}: cannot write it ({err.strerror}); give a writable path",
                        every_rank=False) from None
