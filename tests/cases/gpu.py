"""Cases that need CUDA GPUs (test_gpu.py): Transformer Engine's layers, both pools on them, bf16
and FP8 (tensorwise, blockwise), full recompute under FP8, gradient-accumulation fusion on the
shared pool, and layouts on 2 GPUs.

Training cases use ``tests.cases.gpu_path.run`` (tiny_cpu.yaml, SwiGLU; 4 micro-batches per step
in one process, 2 per data-parallel rank on 2 GPUs) for ``STEPS`` steps at a learning rate where
the loss falls by a third, and return step -> [loss, grad norm], the plan and the FP8 state of
the TE modules (``gpu_path.fp8_state``). The fusion cases are tests/cases/wgrad_fusion.py's, in
fp32 (TF32 off) and in FP8.
"""

from functools import partial

from tests.cases.gpu_path import run
from tests.cases.wgrad_fusion import build_collectives, compare
from tests.distributed import Cases

CASES = Cases()
TE = "model.transformer_impl=transformer_engine"
LOCAL = "model.transformer_impl=local"
BF16, FP32, FP8 = "train.precision=bf16", "train.precision=fp32", "train.precision=fp8"
TENSORWISE, BLOCKWISE = "train.fp8_recipe=tensorwise", "train.fp8_recipe=blockwise"
SEQ, GROUPED = "moe.expert_impl=sequential", "moe.expert_impl=grouped"
STEPS = 16
MOVING = (f"train.steps={STEPS}", "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-4")


def _run(tag: str, layout: str, *overrides: str, **kwargs):
    return partial(run, tag, layout, *MOVING, *overrides, **kwargs)


# Transformer Engine's layers against Megatron-Core's local ones, same weights (both keyed alike),
# and the grouped pool against the sequential pool on TE.
CASES.add("local_bf16", _run("local_bf16", "single", LOCAL, SEQ, BF16), nproc=1)
for _pool, _impl in (("sequential", SEQ), ("grouped", GROUPED)):
    CASES.add(f"te_bf16[{_pool}]", _run(f"te_bf16_{_pool}", "single", TE, _impl, BF16), nproc=1)
    for _recipe, _flag in (("tensorwise", TENSORWISE), ("blockwise", BLOCKWISE)):
        CASES.add(f"te_fp8_{_recipe}[{_pool}]",
                  _run(f"te_fp8_{_recipe}_{_pool}", "single", TE, _impl, FP8, _flag), nproc=1)

# Full recompute under FP8 (Megatron then recomputes through TE's own checkpoint function).
CASES.add("te_fp8_full_recompute", _run("te_fp8_recompute", "single", TE, GROUPED, FP8,
                                        "train.recompute=full"), nproc=1)

# An FP8 checkpoint resumes in bf16, and a bf16 one in FP8.
CASES.add("save_fp8", _run("save_fp8", "single", TE, GROUPED, FP8, save_at=2), nproc=1)
CASES.add("fp8_to_bf16", _run("fp8_to_bf16", "single", TE, GROUPED, BF16, resume_from="save_fp8"),
          nproc=1)
CASES.add("save_te_bf16", _run("save_te_bf16", "single", TE, GROUPED, BF16, save_at=2), nproc=1)
CASES.add("bf16_to_fp8", _run("bf16_to_fp8", "single", TE, GROUPED, FP8,
                              resume_from="save_te_bf16"), nproc=1)

# Gradient-accumulation fusion on the shared pool: fused against unfused main_grads, and with
# the fix undone (the first call's overwrite), in fp32 and in FP8 (where the overwrite came back
# at every step).
for _pool in ("sequential", "grouped"):
    CASES.add(f"fusion_fp32[{_pool}]", partial(compare, "single", _pool, TE, FP32), nproc=1)
    CASES.add(f"fusion_fp8[{_pool}]", partial(compare, "single", _pool, TE, FP8, TENSORWISE),
              nproc=1)

# Layouts on 2 GPUs against 1: in fp32 (TF32 off), so the tolerance is about layouts, not
# rounding; in bf16 and FP8 under EP2 and PP2; the build's collectives on the GPU.
CASES.add("te_fp32[single]", _run("te_fp32_single", "single", TE, FP32), nproc=1)
for _layout in ("tp2", "ep2", "pp2"):
    CASES.add(f"te_fp32[{_layout}]", _run(f"te_fp32_{_layout}", _layout, TE, FP32), nproc=2)
for _layout in ("ep2", "pp2"):
    CASES.add(f"te_bf16[{_layout}]", _run(f"te_bf16_{_layout}", _layout, TE, GROUPED, BF16),
              nproc=2)
    CASES.add(f"te_fp8_tensorwise[{_layout}]",
              _run(f"te_fp8_{_layout}", _layout, TE, GROUPED, FP8, TENSORWISE), nproc=2)
CASES.add("build[pp2]", partial(build_collectives, "pp2"), nproc=2)
