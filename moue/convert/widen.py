"""``moue-convert widen``: a standard-topology checkpoint as a progressively widened MoUE.

What changes (``moue.model.widening`` has the schedule): ``moe.topology=rotational`` with
``moe.stride = N`` (the standard model's experts per layer) and ``moe.window = W``, plus
``moe.widen_block = N`` and ``moe.widen_steps = R``. Every weight is copied; layer ``l``'s router
gets one row per pool expert of its window, in the window's order: its own experts keep their
rows, and an expert ``e`` owned by layer ``l' = e // N`` gets row ``e - l'*N`` of that layer's
router. A trajectory state (``moe.router_state_dim=D``) may be switched on: U starts at its usual
initialisation, its term is opened over the same ramp. The balance state starts afresh.
Written like ``import``: ``step_0000000`` (model-only, in the checkpoint's dtype), ``config.yaml``
(the run's own layout, implementation and precision, widened; ``data.start_sample`` where the
base's run stopped, so the widened model trains on data the base has not seen), atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moue import checkpoint
from moue.checkpoint import publish_new
from moue.commands.standalone import loaded_chunk, new_chunk, standalone_config, standalone_world
from moue.config import RunConfig, load_config
from moue.convert.importing import new_output
from moue.run_check import check_run
from parallel.errors import UserError

ROUTER_KEY = re.compile(r"decoder\.layers\.(\d+)\.mlp\.router\.weight")
FRESH = ("decoder.pool_balance.", "decoder.expert_embedding.")


def widened_tree(source: RunConfig, window: int, steps: int) -> dict:
    """The config (as a dict) of ``source`` widened to windows of ``window`` over ``steps``."""
    moe = source.moe
    if moe.topology != "standard" or moe.router_state_dim:
        raise UserError(f"--load: moe.topology={moe.topology!r}, moe.router_state_dim="
                        f"{moe.router_state_dim}; widening starts from a standard-topology model "
                        "without the trajectory state (what moue-convert import writes)")
    block = source.topology().window
    if not block < window <= moe.num_experts:
        raise UserError(f"--window {window}: must lie in ({block}, {moe.num_experts}]: wider "
                        f"than each layer's own {block} experts, at most the pool")
    tree = source.to_dict()
    tree["moe"].update(topology="rotational", window=window, stride=block, widen_block=block,
                       widen_steps=steps)
    return tree


def widened_routers(state: dict, source: RunConfig, target: RunConfig) -> dict:
    """Each MoE layer's router over its new window (module docstring)."""
    freq, block = source.model.moe_layer_freq, source.topology().window
    rows = {int(m[1]) // freq: w for k, w in state.items() if (m := ROUTER_KEY.fullmatch(k))}
    out = {}
    for index in range(len(target.model.moe_layers)):
        eligible = target.topology().eligible(index).tolist()
        out[f"decoder.layers.{index * freq}.mlp.router.weight"] = torch.stack(
            [rows[e // block][e % block] for e in eligible])
    return out


def widen(load: str, output: str, window: int, steps: int, overrides: list[str]) -> Path:
    """Write checkpoint ``load`` widened (module docstring) to ``output``; returns its path."""
    out, tmp = new_output(output, "--output")
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith(("model.", "moe.")) and key != "moe.router_state_dim":
            raise UserError(f"override {item!r}: the architecture is the checkpoint's, widened "
                            "by --window; of model and moe, only moe.router_state_dim may be set")
    if steps < 1:
        raise UserError(f"--steps {steps}: give the ramp's length in steps, >= 1")
    path = checkpoint.resolve(load)
    meta = checkpoint.saved_config(path)
    saved = meta["config"]
    dtype = checkpoint.stored_dtype(path)
    tree = widened_tree(load_config(None, ["checkpoint.dir=null"], base=saved), window, steps)
    tree["data"]["start_sample"] = checkpoint.next_sample(meta)  # continue on unseen data
    target = load_config(None, [*overrides, f"checkpoint.dir={out.resolve()}"], base=tree)
    check_run(target)
    source = standalone_config(saved, dtype)
    single = standalone_config(tree, dtype,
                                [f"moe.router_state_dim={target.moe.router_state_dim}"])
    with standalone_world(source, "moue-convert") as pg:
        old = loaded_chunk(path, source, pg)
        state = old.state_dict()
        # initialised: U and the balance state start afresh (module docstring)
        module = new_chunk(single, pg)
        fresh = module.state_dict()
        kept = {k: v for k, v in state.items() if not k.startswith(FRESH) and k in fresh}
        module.load_state_dict({**fresh, **kept, **widened_routers(state, source, single)})
        del old, state, kept
        publish_new(out, tmp, module, target, pg)
    return out
