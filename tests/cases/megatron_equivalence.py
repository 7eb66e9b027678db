"""Cases: Megatron-Core itself on CPU processes, before any MoUE code (run by test_megatron_cpu)."""

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel.launch import init_model_parallel, seed_everything
from parallel.layout import ParallelLayout
from tests.distributed import Cases
from tests.megatron_gpt import LAYOUTS, TinyGPT, layout_for, train

CASES = Cases()

CASES.add("gpt_train[single]", partial(lambda: train(TinyGPT(), layout_for("single", 1))), nproc=1)
for _name in LAYOUTS:
    CASES.add(f"gpt_train[{_name}]", partial(lambda n: train(TinyGPT(), layout_for(n, 2)), _name), nproc=2)
