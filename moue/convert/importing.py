"""What every import writes: a moue checkpoint directory of the standard topology, staged under
a hidden name and renamed only once complete.

The directory holds ``step_0000000`` (the weights: a model-only checkpoint, which starts a run
with a fresh optimizer), ``latest``,
``config.yaml`` (``checkpoint.dir`` is the directory itself, ``data.mock=true`` until a dataset
is given, ``data.tokenizer`` the copied tokenizer), the tokenizer files and ``source.json``
(where the weights came from). Importers differ only in how they read the source's
architecture (the ``model`` and ``moe`` sections) and its weights (``fill``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from data_tools.tokenizer import load_tokenizer
from moue.checkpoint import publish_new
from moue.commands import standalone
from moue.commands.standalone import (
    new_chunk,
    standalone_config,
    standalone_world,
)
from moue.config import RunConfig, load_config, may_change_on_resume
from moue.convert.hf_format import tokenizer_files
from moue.run_check import check_run
from parallel.errors import UserError


def new_output(output: str, flag: str, spread: bool = False) -> tuple[Path, Path]:
    """``moue-convert``'s output path and its staging twin (``moue.commands.standalone``);
    ``spread``: the command may run on several processes."""
    return standalone.new_output(output, flag, "moue-convert", spread)


def check_overrides(overrides: list[str], source: str) -> None:
    """Refuse overrides of the architecture, which comes from ``source``."""
    free = set(may_change_on_resume())
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.split(".", 1)[0] in ("model", "moe") and key not in free:
            raise UserError(f"override {item!r}: the architecture comes from {source}; "
                            f"override {', '.join(sorted(free))}, or the parallel, train, "
                            "data, checkpoint or logging sections")


def check_tokenizer(tokenizer: str, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids all fit the model's embedding (``where`` names the vocab's source)."""
    vocab = load_tokenizer(tokenizer).vocab_size
    if vocab > vocab_size:
        raise UserError(f"{tokenizer}: {vocab} tokens, more than the model's vocab_size="
                        f"{vocab_size} in {where}; the tokenizer belongs to another model: use "
                        "the checkpoint's own")


def write_imported(out: Path, tmp: Path, tree: dict, tokenizer: str, overrides: list[str],
                   fill: Callable[[RunConfig, torch.nn.Module], None], source: dict,
                   dtype: torch.dtype = torch.float32, spread: bool = False) -> Path:
    """Write the checkpoint of ``tree`` (the ``model`` and ``moe`` sections) to ``out``.

    ``tokenizer`` is ``byte`` or a tokenizer file, copied with its known siblings;
    ``fill(cfg, module)`` puts every weight into ``module`` (moue's model on this process,
    built in ``dtype`` and not initialised; ``spread``: this process's share of the experts
    under a launch of several, ``moue.commands.standalone``); ``source`` is written as
    ``source.json``. The weights are written as a model-only checkpoint in ``dtype``.
    """
    final = out.resolve()
    tok = None if tokenizer == "byte" else Path(tokenizer)
    target = load_config(None, overrides, base={
        **tree, "data": {"mock": True, "tokenizer": str(final / tok.name) if tok else "byte"},
        "checkpoint": {"dir": str(final)}})
    check_run(target)
    single = standalone_config(tree, dtype, [f"data.tokenizer={tokenizer}"], spread=spread)
    files: dict[str, str | Path] = {
        "source.json": json.dumps(source, indent=2, default=str) + "\n"}
    if tok is not None:
        files.update({name: tok.parent / name for name in tokenizer_files(tok.parent)})
        files.setdefault(tok.name, tok)
    with standalone_world(single, "moue-convert") as pg:
        module = new_chunk(single, pg, initialise=False)
        with torch.no_grad(), standalone.together():
            fill(single, module)
        publish_new(out, tmp, module, target, pg, files)
    return out
