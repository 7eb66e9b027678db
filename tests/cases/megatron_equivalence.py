"""Cases: Megatron-Core's own GPT with MoE (no MoUE module) on moue's Trainer, on CPU processes
(see test_megatron_cpu.py)."""

import traceback
from functools import partial

import torch
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from moue.training.engine import build_engine
from parallel import cpu_backend
from parallel.launch import init_model_parallel
from parallel.layout import ParallelLayout
from tests.distributed import Cases
from tests.equivalence import LAYOUTS, STANDARD, MegatronMoE, layout_for, tiny, train

CASES = Cases()
FUSED = "train.grad_accum_fusion=true"  # Megatron's linears write main_grad (apex's kernel)


class _PlainOptimizer(MegatronMoE):
    """Megatron's plain (not distributed) optimizer: every rank keeps the whole Adam state."""

    def build_engine(self, module):
        return build_engine(module, module.config, self.cfg.train, distributed_optimizer=False)


def _train(layout: str, world_size: int, *overrides: str, trainer=MegatronMoE) -> dict:
    run = train(tiny(*STANDARD, *overrides), layout_for(layout, world_size), trainer=trainer)
    return {"losses": run["losses"], "grad_norms": run["grad_norms"]}


CASES.add("gpt_train[single]", partial(_train, "single", 1), nproc=1)
for _name in LAYOUTS:
    CASES.add(f"gpt_train[{_name}]", partial(_train, _name, 2), nproc=2)
CASES.add("gpt_train[single_fused]", partial(_train, "single", 1, FUSED), nproc=1)
CASES.add("gpt_train[dp2_plain_optimizer]",
          partial(_train, "dp2", 2, trainer=_PlainOptimizer), nproc=2)


def _deepest_megatron_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/megatron/core/" in f.filename]
    return frames[-1].filename.split("/megatron/core/")[-1] if frames else ""


def _without(name: str, layout: str, world_size: int) -> dict:
    """One training step with one CPU adaptation switched off: the error it raises, if any."""
    if cpu_backend.active().applied[name] == 0:
        return {"applies": False}  # this Megatron-Core release needs no adaptation here
    cpu_backend.enable(skip={name})
    # apex's kernels are called only with gradient-accumulation fusion
    fused = (FUSED,) if name == "apex_wgrad_kernels" else ()
    try:
        train(tiny(*STANDARD, *fused), layout_for(layout, world_size), steps=1,
              trainer=MegatronMoE)
    except Exception as err:
        return {"applies": True, "error": f"{type(err).__name__}: {err}"[:300],
                "megatron_file": _deepest_megatron_frame(err)}
    return {"applies": True, "error": None}


# The all-to-all split sizes are only used when the expert-parallel group has 2+ ranks.
for _name in cpu_backend.ADAPTATIONS:
    if _name == "alltoall_splits":
        CASES.add(f"without[{_name}]", partial(_without, _name, "ep2", 2), nproc=2)
    else:
        CASES.add(f"without[{_name}]", partial(_without, _name, "single", 1), nproc=1)


def _tp_mlp(sequence_parallel: bool) -> dict:
    """Column- then row-parallel linear (TP=2) against the same product with nn.Linear."""
    init_model_parallel(ParallelLayout(world_size=2, tp=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    seq, batch, hidden, ffn = 8, 2, 16, 24
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(ffn, hidden, generator=g), torch.randn(hidden, ffn, generator=g)
    x = torch.randn(seq, batch, hidden, generator=g)
    out_grad = torch.randn(seq, batch, hidden, generator=g)

    ref_x = x.clone().requires_grad_()
    fc1, fc2 = torch.nn.Linear(hidden, ffn, bias=False), torch.nn.Linear(ffn, hidden, bias=False)
    fc1.weight.data.copy_(w1), fc2.weight.data.copy_(w2)
    ref_y = fc2(torch.nn.functional.gelu(fc1(ref_x)))
    ref_y.backward(out_grad)

    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                                 use_cpu_initialization=True)
    col = ColumnParallelLinear(hidden, ffn, config=config, init_method=torch.nn.init.zeros_,
                               bias=False, gather_output=False)
    row = RowParallelLinear(ffn, hidden, config=config, init_method=torch.nn.init.zeros_,
                            bias=False, input_is_parallel=True, skip_bias_add=True)
    shard = slice(rank * ffn // 2, (rank + 1) * ffn // 2)
    col.weight.data.copy_(w1[shard]), row.weight.data.copy_(w2[:, shard])
    seq_shard = slice(rank * seq // 2, (rank + 1) * seq // 2) if sequence_parallel else slice(None)
    par_x = x[seq_shard].clone().requires_grad_()
    par_y, _ = row(torch.nn.functional.gelu(col(par_x)[0]))
    par_y.backward(out_grad[seq_shard])

    def err(a, b):
        return (a - b).abs().max().item()

    return {"forward": err(par_y, ref_y[seq_shard]),
            "input_grad": err(par_x.grad, ref_x.grad[seq_shard]),
            "col_weight_grad": err(col.weight.grad, fc1.weight.grad[shard]),
            "row_weight_grad": err(row.weight.grad, fc2.weight.grad[:, shard]),
            "scale": ref_y.abs().max().item()}


CASES.add("tp_mlp[no_sp]", partial(_tp_mlp, False), nproc=2)
CASES.add("tp_mlp[sp]", partial(_tp_mlp, True), nproc=2)
