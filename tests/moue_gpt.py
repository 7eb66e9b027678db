"""MoUE models for the equivalence tests: a builder for tests.megatron_gpt.train."""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from moue.config import RunConfig, load_config
from moue.model.builder import balance_modules, pipeline_shapes
from moue.model.chunk import build_chunk
from moue.run_check import plan_run
from parallel.layout import ParallelLayout
from parallel.pool_sync import finish_step_loads
from tests.megatron_gpt import Built, Data

# A small rotational MoUE: 4 layers sharing a pool of 8 experts, windows of 4 with stride 2
# (adjacent layers share 2 experts; under pp=2 the windows cross the stage boundary).
TINY = ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128",
        "moe.num_experts=8", "moe.expert_ffn_hidden_size=32", "moe.topk=2",
        "moe.topology=rotational", "moe.window=4", "moe.stride=2", "moe.router_state_dim=8",
        "moe.balance=uelb", "moe.balance_coeff=0.01"]


def tiny(*overrides: str) -> RunConfig:
    return load_config(None, [*TINY, *overrides])


def moue_builder(cfg: RunConfig):
    """Builds ``cfg``'s chunk through the model API the Trainer uses (``moue.model.chunk``);
    the harness then fills it by global key (``tests.megatron_gpt``)."""
    def build_fn(layout: ParallelLayout, seed: int) -> Built:
        model = build_chunk(cfg.model, cfg.moe, cfg.train, cfg.topology(), layout, plan_run(cfg),
                            torch.device("cpu"), ProcessGroupCollection.use_mpu_process_groups())
        balances = balance_modules([model])
        return Built(model, model.config, Data(cfg.model.vocab_size, cfg.model.seq_length),
                     pipeline_shapes=pipeline_shapes(cfg.moe.router_state_dim),
                     after_step=lambda: finish_step_loads(balances))
    return build_fn
