"""Activation recomputation: every rule moue applies to ``train.recompute`` and
``train.recompute_modules``, and how they become Megatron's ``TransformerConfig`` fields.

- ``full``: each layer recomputed from its input in the backward pass (Megatron's uniform
  method, one layer per checkpoint); the layer replays the elastic settings each micro-batch ran
  with (``moue.model.layer``).
- ``selective``: Megatron's module names in ``RECOMPUTE_MODULES``; those in ``UNSAFE`` are
  refused when the config is read (the shared pool and the router's state), those in
  ``NEEDS_TRANSFORMER_ENGINE`` when the run's plan has no Transformer Engine layers
  (``moue.run_check.plan_run``).
"""

from __future__ import annotations

RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "shared_experts")
UNSAFE = {
    "moe": "recomputes whole MoE layers (Megatron's 'moe'), router included: the router's "
           "trajectory state and the pool's load counts are side effects of its forward, and a "
           "second forward under recompute would update them twice; use train.recompute=full "
           "(built for this) or leave 'moe' out",
    "moe_act": "keeps its recompute checkpoint on the expert module, and the pool is one module "
               "serving every MoE layer: each layer would overwrite the previous layer's before "
               "its backward; leave 'moe_act' out (or use train.recompute=full)",
    "mla_up_proj": "needs multi-latent attention, which moue models do not have",
}
# tensor_parallel.CheckpointWithoutOutput() reads Transformer Engine's FP8 state even when FP8
# is off (megatron-core 0.16.1 and 0.19): a NameError without TE.
NEEDS_TRANSFORMER_ENGINE = {
    "layernorm": "needs Transformer Engine's layers (Megatron-Core's norm recompute calls into "
                 "Transformer Engine); leave it out, or run where model.transformer_impl "
                 "resolves to transformer_engine",
}


def megatron_fields(recompute: str, modules: list[str] | None) -> dict:
    """``TransformerConfig``'s recompute fields for ``train.recompute`` and its modules."""
    if recompute == "full":  # every layer's input kept, the layer recomputed in backward
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    if recompute == "selective":
        return dict(recompute_granularity="selective",
                    recompute_modules=list(modules or ["core_attn"]))
    return {}
