"""Putting a sub-model onto a built model: the one place that changes the per-step hooks.

For one model chunk (this rank's pipeline stage) ``apply_submodel`` sets
- each layer's ``skip`` (a skipped layer is the identity for the hidden states and for the
  trajectory state, ``moue.model.layer``);
- the experts kept (``SharedRouting.elastic.keep_E``) and the Elastic MoE options, read by every
  router;
- the top-k, once, on the chunk's ``TransformerConfig`` (``moe_router_topk``), which every
  router (``UniversalRouter.topk``) and Megatron's dispatchers (megatron-core 0.16 and 0.19
  size their permutation from it) read;
- the balance's effective eligibility (``Balance.set_eligibility``).

The full model is ``apply_submodel(chunk, full)``: then every hook has its value of a run
without elastic training, so such a step computes exactly what it would without it.
"""

from __future__ import annotations

import torch

from moue.elastic.submodel import SubModel
from moue.model.router import ElasticRouting


def effective_mask(topology, moe_layer_freq: int, sub: SubModel) -> torch.Tensor:
    """The eligibility [L_moe, E] of a sub-model: skipped MoE layers' rows and dropped experts'
    columns cleared."""
    rows_L = torch.zeros(topology.num_layers, dtype=torch.bool)
    rows_L[[i // moe_layer_freq for i in sub.layers if i % moe_layer_freq == 0]] = True
    cols_E = torch.zeros(topology.num_experts, dtype=torch.bool)
    cols_E[list(sub.experts)] = True
    return topology.mask_LE & rows_L[:, None] & cols_E[None, :]


def apply_submodel(chunk: torch.nn.Module, sub: SubModel, *, coactivation_prob: float = 0.0,
                   k_ideal: int = 0, routing_seed: int = 0,
                   sharpen_coeff: float = 0.0) -> torch.Tensor | None:
    """Make ``chunk`` (an unwrapped GPTModel stage) compute ``sub`` from its next forward on.
    Returns the effective eligibility the balance uses, or None when it is the whole mask."""
    decoder = chunk.decoder
    kept = set(sub.layers)
    for layer in decoder.layers:
        layer.skip = layer.layer_number - 1 not in kept
        layer.skip_b = None  # per-sample skips are per micro-batch (moue.elastic.microbatch)
        layer.recompute_queue.clear()  # a step that failed part-way leaves none for the next
    routers = [layer.mlp.router for layer in decoder.layers if layer.is_moe_layer]
    if not routers:
        return None
    shared = routers[0].shared
    topology = shared.topology
    device = decoder.pool_balance.loads_E.device
    keep_E = None
    if len(sub.experts) < topology.num_experts:
        keep_E = torch.zeros(topology.num_experts, dtype=torch.bool, device=device)
        keep_E[list(sub.experts)] = True
    shared.elastic = ElasticRouting(keep_E, coactivation_prob, k_ideal, routing_seed,
                                    sharpen_coeff)
    chunk.config.moe_router_topk = sub.topk
    mask_LE = effective_mask(topology, shared.moe_layer_freq, sub)
    if torch.equal(mask_LE, topology.mask_LE):
        mask_LE = None
    shared.balance.set_eligibility(mask_LE)
    return mask_LE
