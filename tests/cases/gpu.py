"""Cases that need CUDA GPUs (test_gpu.py): Transformer Engine's layers, the grouped GEMM pool on
Transformer Engine, FP8, and parallel layouts on 2 GPUs. Built on ``tests.cases.gpu_path.run``
(tiny_cpu.yaml, SwiGLU); every case returns step -> [loss, grad norm], and the run's plan.
"""

from functools import partial

from tests.cases.gpu_path import run
from tests.distributed import Cases

CASES = Cases()
TE = "model.transformer_impl=transformer_engine"
LOCAL = "model.transformer_impl=local"
BF16, FP32, FP8 = "train.precision=bf16", "train.precision=fp32", "train.precision=fp8"
SEQ, GROUPED = "moe.expert_impl=sequential", "moe.expert_impl=grouped"
LONG = ("train.steps=50", "train.warmup_steps=5")

# Transformer Engine's layers against Megatron-Core's local ones, same weights (both keyed alike).
CASES.add("local_bf16", partial(run, "local_bf16", "single", LOCAL, SEQ, BF16), nproc=1)
CASES.add("te_bf16_sequential", partial(run, "te_bf16_seq", "single", TE, SEQ, BF16), nproc=1)
CASES.add("te_bf16_grouped", partial(run, "te_bf16_grouped", "single", TE, GROUPED, BF16), nproc=1)

# FP8 over 50 steps against bf16; an fp8 checkpoint resumes in bf16 and back.
CASES.add("te_bf16_long", partial(run, "te_bf16_long", "single", TE, BF16, *LONG), nproc=1)
CASES.add("te_fp8_long", partial(run, "te_fp8_long", "single", TE, FP8, *LONG), nproc=1)
CASES.add("save_fp8", partial(run, "save_fp8", "single", TE, FP8, save_at=2), nproc=1)
CASES.add("fp8_to_bf16", partial(run, "fp8_to_bf16", "single", TE, BF16, resume_from="save_fp8"),
          nproc=1)
CASES.add("save_te_bf16", partial(run, "save_te_bf16", "single", TE, BF16, save_at=2), nproc=1)
CASES.add("bf16_to_fp8", partial(run, "bf16_to_fp8", "single", TE, FP8,
                                 resume_from="save_te_bf16"), nproc=1)

# Layouts on 2 GPUs against 1, in fp32 (so the tolerance is about layouts, not rounding).
CASES.add("te_fp32[single]", partial(run, "te_fp32_single", "single", TE, FP32), nproc=1)
for _layout in ("tp2", "ep2", "pp2"):
    CASES.add(f"te_fp32[{_layout}]", partial(run, f"te_fp32_{_layout}", _layout, TE, FP32),
              nproc=2)
