"""``moue-export``: a standalone checkpoint of one elastic sub-model (``moue.elastic.extract``
says what it keeps).

What is written: a ``checkpoint.dir`` whose ``step_0000000`` is a model-only checkpoint in the
source's dtype, ``config.yaml`` (``checkpoint.dir`` is the output; the overrides given to the
command apply: the layout, the schedule of continued training; ``data.start_sample`` is where
the full model's run stopped, so continued training reads data it has not seen) and
``submodel.json`` (where it came from). ``moue-pretrain --config OUT/config.yaml`` continues
training it under any layout (step 0, a fresh optimizer, the configured schedule);
``moue-eval --load OUT`` evaluates it. It runs as one process on the CPU, with no optimizer:
the full model is loaded whole (whatever layout it was saved under) beside the sub-model. The
output appears under its final name only once complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from moue import checkpoint
from moue.checkpoint import publish_new
from moue.commands.standalone import (
    loaded_chunk,
    new_chunk,
    new_output,
    standalone_config,
    standalone_world,
)
from moue.config import load_config
from moue.elastic.extract import reachable_only, submodel_state, submodel_tree
from moue.elastic.submodel import parse
from moue.run_check import check_run
from parallel.errors import UserError


def export(load: str, text: str, output: str, overrides: list[str]) -> Path:
    """Write the sub-model ``text`` of checkpoint ``load`` to ``output``; returns its path."""
    for item in overrides:
        if item.split(".", 1)[0] in ("model", "moe"):
            raise UserError(f"override {item!r}: the model and moe sections of the export come "
                            "from the checkpoint and --submodel; override the layout, train, "
                            "data, logging or elastic sections only")
    out, tmp = new_output(output, "--output", "moue-export")
    path = checkpoint.resolve(load)
    meta = checkpoint.saved_config(path)
    saved = meta["config"]
    dtype = checkpoint.stored_dtype(path)
    cfg = standalone_config(saved, dtype)
    choices = cfg.elastic_choices()
    if choices is None:
        raise UserError("this checkpoint is of the dense model (model.moe_layer_freq=0): it has "
                        "no sub-models to export")
    sub = reachable_only(parse(text, choices, cfg.topology().window), cfg)
    tree = submodel_tree(cfg, sub)
    tree["checkpoint"] = {**tree["checkpoint"], "dir": str(out)}
    for section, key in (("model", "transformer_impl"), ("moe", "expert_impl")):
        tree[section] = {**tree[section], key: saved.get(section, {}).get(key, "auto")}
    kept = {k: saved[k] for k in ("parallel", "data", "train") if k in saved}
    # continued training reads what the full model has not seen
    kept["data"] = {**kept.get("data", {}), "start_sample": checkpoint.next_sample(meta)}
    target = load_config(None, overrides, base={**tree, **kept})
    try:
        check_run(target)
    except UserError as err:
        raise UserError(f"the exported sub-model ({sub.label}): {err}") from None
    single = standalone_config(tree, dtype)
    with standalone_world(cfg, "moue-export") as pg:
        full = loaded_chunk(path, cfg, pg)
        # not initialised: every weight comes from the full model (load_state_dict is strict)
        module = new_chunk(single, pg, initialise=False)
        module.load_state_dict(submodel_state(full.state_dict(), cfg, sub, module.state_dict()))
        del full
        publish_new(out, tmp, module, target, pg, {"submodel.json": json.dumps(
            {"source": str(path), "submodel": text, "exported": sub.label,
             "layers": list(sub.layers), "experts": list(sub.experts), "topk": sub.topk},
            indent=2) + "\n"})
    return out
