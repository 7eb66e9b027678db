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

``--tokens FILE.npy`` instead evaluates the full model on a given ``[batch, seq]`` integer array:
each row predicts its tokens 1..seq-1 from the ones before, and the result is the mean loss over
all ``batch x (seq - 1)`` positions, the number to compare with another implementation run on the
same array (the sequence length need not be the checkpoint's: RoPE has no learned positions);
``--logits OUT.npy`` also saves the logits ``[batch, seq-1, V]`` (float32), gathered over the
tensor- and data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from moue import checkpoint
from moue.config import RunConfig, load_config
from moue.elastic.submodel import SubModel, family, full, parse
from moue.model.size import sizes
from moue.run_check import check_run
from parallel import launch
from parallel.errors import UserError
from parallel.reduce import is_last_stage, is_logging_rank


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
    path = checkpoint.resolve(load)
    cfg = checkpoint_config(path, overrides)
    if not cfg.data.valid_share:
        raise UserError(f"data.split={cfg.data.split} leaves no validation split, which "
                        "moue-eval scores: pass data.split=98,2,0 (or --tokens FILE.npy)")
    subs = submodels_to_evaluate(cfg, texts, whole_family)
    env = launch.read_launch_env()
    with loaded_trainer(path, cfg, check_run(cfg, env.world_size), env) as trainer:
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


@contextlib.contextmanager
def loaded_trainer(path: Path | None, cfg: RunConfig, layout, env, device: str = "auto",
                   datasets: bool = True):
    """A Trainer that evaluates (forward passes only: no optimizer, no DDP buffers) holding the
    checkpoint's weights (``path`` None: freshly initialised ones), between process-group start
    and stop (``datasets``: the Trainer's)."""
    from moue.training.trainer import Trainer

    launch.init_distributed(layout, device=device, env=env)
    trainer = None
    try:
        launch.seed_everything(cfg.train.seed)
        trainer = Trainer(cfg, layout, launch.resolve_device(device), datasets=datasets,
                          training=False)
        if path is not None:
            meta = checkpoint.load_model(path, trainer.model.module, cfg, trainer.pg)
            # what depends on the step: widening (a model-only checkpoint is at step 0)
            trainer.state.step = meta.get("state", {}).get("step", 0)
        yield trainer
    finally:
        if trainer is not None:
            trainer.close()
        launch.shutdown()


class TokenRows:
    """Rows of a ``[batch, seq]`` token array as the Trainer's samples (next-token targets)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        n = len(row) - 1
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(n),
                "position_ids": torch.arange(n)}


def read_tokens(path: str) -> torch.Tensor:
    """The ``[batch, seq]`` array of ``--tokens``, or a ``UserError`` saying what is wrong."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--tokens {path}: cannot read it as a .npy array ({err}); save the "
                        "tokens with numpy.save") from None
    if array.ndim != 2 or array.shape[1] < 2 or array.shape[0] < 1:
        raise UserError(f"--tokens {path}: shape {list(array.shape)}; give a [batch, seq] "
                        "array with seq >= 2 (row r predicts its tokens 1.. from those before)")
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"--tokens {path}: dtype {array.dtype}; give integer token ids")
    return torch.from_numpy(array.astype(np.int64))


def _check_vocabulary(path: str, rows: torch.Tensor, vocab_size: int) -> None:
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= vocab_size:
        raise UserError(f"--tokens {path}: token ids span {low}..{high}, outside the model's "
                        f"vocabulary 0..{vocab_size - 1} (model.vocab_size={vocab_size}); "
                        "tokenize with the checkpoint's tokenizer")


def _logits_step(store: list, tp_group):
    """A forward step that keeps each micro-batch's logits, whole over the vocabulary, in
    ``store`` (on the last pipeline stage) and returns the mean next-token loss."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        logits = model(mb["tokens"], mb["position_ids"], attention_mask=None)  # [b, s, V/tp]

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output, tp_group).float()
            store.append(full)
            loss = torch.nn.functional.cross_entropy(full.flatten(0, 1), mb["labels"].flatten())
            return loss, {"lm loss": loss.detach().clone()}

        return logits, loss_func

    return forward_step


@torch.no_grad()
def token_logits(trainer, rows: torch.Tensor) -> torch.Tensor | None:
    """The full model's logits ``[batch, seq-1, V]`` on ``rows`` (``[batch, seq]``, row ``r``'s
    position ``i`` predicting token ``i+1``), on the last pipeline stage's ranks (None on the
    others); rows are spread over data-parallel ranks, as ``evaluate_tokens`` does."""
    store: list[torch.Tensor] = []
    trainer.evaluate(TokenRows(rows), _logits_step(store, trainer.pg.tp))
    if not is_last_stage(trainer.pg):
        return None
    mine = torch.cat(store)
    parts = [torch.empty_like(mine) for _ in range(trainer.pg.dp.size())]
    torch.distributed.all_gather(parts, mine, group=trainer.pg.dp)
    return torch.cat(parts).cpu()


def tokens_config(path: Path, rows: torch.Tensor, overrides: list[str]) -> RunConfig:
    """The checkpoint's config set to evaluate ``rows`` ([batch, seq]) as one global batch."""
    batch, seq = rows.shape[0], rows.shape[1] - 1
    return checkpoint_config(path, [*overrides, f"model.seq_length={seq}", "data.mock=true",
                                    f"train.global_batch_size={batch}", "train.micro_batch_size=1",
                                    "train.eval_iters=1"])


def evaluate_tokens(load: str, tokens: str, overrides: list[str],
                    logits_path: str | None = None) -> dict:
    """Mean next-token loss of the full model over a token array (the same on every rank);
    ``logits_path``: also save the logits ``[batch, seq-1, V]`` there (numpy, float32)."""
    path = checkpoint.resolve(load)
    rows = read_tokens(tokens)
    batch, seq = rows.shape[0], rows.shape[1] - 1
    cfg = tokens_config(path, rows, overrides)
    _check_vocabulary(tokens, rows, cfg.model.vocab_size)
    env = launch.read_launch_env()
    try:
        layout = check_run(cfg, env.world_size)
    except UserError as err:
        raise UserError(f"--tokens {tokens}: a [{batch}, {seq + 1}] array cannot run on this "
                        f"layout ({err}); the data-parallel size must divide its {batch} rows, "
                        f"and with parallel.tp > 1 tp must divide its {seq} positions per row "
                        "(row length - 1)") from None
    with loaded_trainer(path, cfg, layout, env, datasets=False) as trainer:
        trainer.use_submodel(submodels_to_evaluate(cfg, [], False)[0])
        loss = trainer.evaluate(TokenRows(rows))
        if logits_path is not None:
            logits = token_logits(trainer, rows)
            if logits is not None and is_logging_rank(trainer.pg):
                _save_array(logits_path, logits.numpy())
    return {"tokens": str(tokens), "rows": batch, "positions": batch * seq, "loss": loss,
            "ppl": math.exp(min(loss, 50.0))}


def _save_array(path: str, array: np.ndarray) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
    except OSError as err:
        raise UserError(f"--logits {path}: cannot write it ({err.strerror}); give a writable "
                        "path", every_rank=False) from None


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


def write_json(rows: list[dict] | dict, path: str, load: str) -> None:
    """The table's rows (or the ``--tokens`` result) as JSON, with the checkpoint."""
    result = {"rows": rows} if isinstance(rows, list) else rows
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"checkpoint": str(load), **result}, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"--json {path}: cannot write it ({err.strerror}); give a writable path",
                        every_rank=False) from None
