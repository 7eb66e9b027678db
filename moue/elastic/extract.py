"""A sub-model taken out of the full model, as a model of its own: its config and its weights
(``moue-export``, in ``moue.commands.export``, writes them as a checkpoint).

What the sub-model keeps:
- the kept layers, renumbered ``0..d-1`` in their order (attention, norms, shared experts, the
  router with only the rows of its kept experts);
- the kept pool experts, re-indexed ``0..m-1`` in ascending pool order, and their rows of U
  (kept experts that no kept layer can reach, which a reduced depth can leave, are dropped:
  they compute nothing for the sub-model);
- the new top-k, and the eligibility as ``moe.topology=explicit`` with ``moe.eligibility``: each
  kept MoE layer's window over the kept experts, in the new ids (the kept rows and columns of
  the old mask);
- the balance state: the kept experts' aux-free bias; the loads start at the new topology's
  shares (a fresh measurement).
"""

from __future__ import annotations

import re

import torch

from moue.config import RunConfig
from moue.elastic.apply import effective_mask
from moue.elastic.submodel import SubModel
from parallel.errors import UserError

LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
EXPERT_KEY = re.compile(r"decoder\.expert_pool\.local_experts\.(\d+)\.(.*)")


def _layer_freq(flags: list[bool]) -> int:
    """The ``model.moe_layer_freq`` whose pattern is ``flags`` (MoE or not per kept layer)."""
    for freq in range(1, len(flags) + 1):
        if all(flag == (i % freq == 0) for i, flag in enumerate(flags)):
            return freq
    raise UserError(f"the kept layers' MoE pattern {['MoE' if f else 'dense' for f in flags]} is "
                    "not 'every k-th layer' (model.moe_layer_freq); choose another depth")


def reachable_only(sub: SubModel, cfg: RunConfig) -> SubModel:
    """``sub`` without the kept experts that none of its kept layers can reach (a reduced depth
    can leave some): they never compute anything for it."""
    reachable_E = effective_mask(cfg.topology(), cfg.model.moe_layer_freq, sub).any(dim=0)
    return SubModel(sub.layers, tuple(e for e in sub.experts if reachable_E[e]), sub.topk)


def submodel_tree(cfg: RunConfig, sub: SubModel) -> dict:
    """The config (as a dict) of the standalone sub-model: shape, top-k and explicit topology."""
    moe_layers = set(cfg.model.moe_layers)
    flags = [i in moe_layers for i in sub.layers]
    if not any(flags):
        raise UserError(f"--submodel {sub.label}: keeps no MoE layer; keep more layers")
    new_id = {old: new for new, old in enumerate(sub.experts)}
    topology, freq = cfg.topology(), cfg.model.moe_layer_freq
    rows = [[new_id[e] for e in topology.eligible(i // freq).tolist() if e in new_id]
            for i in sub.layers if i in moe_layers]
    tree = cfg.to_dict()
    tree["model"].update(num_layers=len(sub.layers), moe_layer_freq=_layer_freq(flags))
    m = len(sub.experts)
    tree["moe"].update(num_experts=m, topk=sub.topk, topology="explicit", eligibility=rows,
                       window=len(rows[0]), stride=len(rows[0]))
    if tree["moe"]["ep_balance_groups"] and m % tree["moe"]["ep_balance_groups"]:
        tree["moe"]["ep_balance_groups"] = 0
    if tree["logging"]["ep_balance_ranks"] and m % tree["logging"]["ep_balance_ranks"]:
        tree["logging"]["ep_balance_ranks"] = 0
    tree["elastic"] = {}  # the family of the old shape does not fit the new one
    return tree


def submodel_state(state: dict, cfg: RunConfig, sub: SubModel, fresh: dict) -> dict:
    """The sub-model's weights from the full model's ``state`` (one process's state_dict);
    ``fresh``: the new model's own state_dict, for the balance loads."""
    layer_id = {old: new for new, old in enumerate(sub.layers)}
    expert_id = {old: new for new, old in enumerate(sub.experts)}
    kept_E = torch.tensor(sub.experts)
    topology, freq = cfg.topology(), cfg.model.moe_layer_freq
    out = {}
    for key, value in state.items():
        if match := LAYER_KEY.fullmatch(key):
            old, rest = int(match[1]), match[2]
            if old in layer_id:
                if rest == "mlp.router.weight":  # rows: the window's pool ids, ascending
                    value = value[torch.isin(topology.eligible(old // freq), kept_E)]
                out[f"decoder.layers.{layer_id[old]}.{rest}"] = value
        elif match := EXPERT_KEY.fullmatch(key):
            if int(match[1]) in expert_id:
                out[f"decoder.expert_pool.local_experts.{expert_id[int(match[1])]}.{match[2]}"] = value
        elif key in ("decoder.expert_embedding.weight", "decoder.pool_balance.bias_E"):
            out[key] = value[kept_E]
        elif key == "decoder.pool_balance.bias_LE":  # rows: the kept MoE layers
            kept_L = torch.tensor([i // freq for i in sub.layers if i % freq == 0])
            out[key] = value[kept_L][:, kept_E]
        elif key == "decoder.pool_balance.loads_E":
            out[key] = fresh[key]
        else:
            out[key] = value
    return out
