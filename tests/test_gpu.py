"""GPU checks (skipped without a CUDA GPU): the reference workload on CUDA with nccl."""

import pytest

from tests.distributed import launch

CASES = "tests.cases.megatron_equivalence"


@pytest.mark.gpu
def test_reference_training_on_gpu_matches_cpu():
    """The same Megatron GPT+MoE, 3 steps, on one GPU and on one CPU process: same losses.

    Different kernels (cuBLAS vs CPU BLAS) reorder float sums, so the tolerance is 1e-4, not the
    1e-5 of the CPU layout tests; TF32 is off by default in torch for matmuls.
    """
    only = ("gpt_train[single]",)
    cpu = launch(CASES, 1, only=only)["gpt_train[single]"][0]
    gpu = launch(CASES, 1, device="cuda", only=only)["gpt_train[single]"][0]
    for key in ("losses", "grad_norms"):
        for g, c in zip(gpu[key], cpu[key], strict=True):
            assert abs(g - c) <= 1e-4 * abs(c), (key, gpu, cpu)
