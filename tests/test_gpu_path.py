"""The parts of the GPU path that run on CPU processes: the grouped pool (torch's grouped GEMM in
Megatron's TEGroupedMLP) against the sequential pool, checkpoints moving between the two pools
and between precisions, and recompute. Cases live in tests/cases/gpu_path.py; tiny_cpu.yaml
with SwiGLU, 4 steps."""

import pytest

from tests.distributed import launch

pytestmark = pytest.mark.compat  # megatron-core 0.19's TEGroupedMLP takes the torch GEMMs too
CASES = "tests.cases.gpu_path"
# Grouped and sequential GEMMs sum in another order: measured differences are ~1e-7 relative
# (fp32), so 1e-5 leaves room and still catches a misplaced or mis-keyed expert (which moves the
# loss by 1e-2 or more).
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = (("MOUE_GPU_PATH_DIR", str(tmp_path_factory.mktemp("gpu_path"))),)
    two = launch(CASES, 2, env_vars=env)
    one = launch(CASES, 1, env_vars=env)
    return lambda case: (two if case in two.by_rank[0] else one)[case]


def _steps(results, case):
    value = results(case)[0]
    return {int(k): v for k, v in value["steps"].items()}


def _close(a, b, steps, rtol=RTOL):
    for step in steps:
        for got, want in zip(a[step], b[step], strict=True):
            assert abs(got - want) <= rtol * abs(want), (step, a, b)


def test_grouped_pool_trains_as_the_sequential_pool(results):
    """From the same initial weights (EP2 steps 1-2; TP2, where the experts are split over the
    expert-tensor-parallel ranks, steps 1-4), and from the same checkpoint (EP2 steps 3-4)."""
    reference = _steps(results, "sequential[ep2]")
    assert sorted(reference) == [1, 2, 3, 4]
    assert results("save_grouped[ep2]")[0]["plan"]["grouped_gemm"] == "torch"
    _close(_steps(results, "save_grouped[ep2]"), reference, (1, 2))
    _close(_steps(results, "grouped[tp2]"), reference, (1, 2, 3, 4))


def test_checkpoints_move_between_the_pools(results):
    """Saved at step 2 by one pool, resumed by the other (EP2 -> EP2, and EP2 -> one process):
    steps 3 and 4 equal the uninterrupted run (weights, optimizer state and all)."""
    straight = _steps(results, "sequential[ep2]")
    assert sorted(_steps(results, "save_sequential[ep2]")) == [1, 2]
    for case in ("sequential_to_grouped[ep2]", "grouped_to_sequential[single]"):
        resumed = _steps(results, case)
        assert sorted(resumed) == [3, 4], case
        _close(resumed, straight, (3, 4))


@pytest.mark.parametrize("case", ["full_recompute[pp2]", "selective_recompute[pp2]"])
def test_recompute_gives_the_numbers_of_keeping_activations(results, case):
    """Under PP2 with the trajectory state crossing the stages, elastic sub-models, co-activation
    sampling and router sharpening: recompute changes memory, not numbers."""
    _close(_steps(results, case), _steps(results, "no_recompute[pp2]"), (1, 2, 3, 4), rtol=1e-6)


def test_bf16_checkpoint_resumes_in_fp32(results):
    bf16 = _steps(results, "save_bf16[ep2]")
    resumed = _steps(results, "bf16_to_fp32[ep2]")
    fp32 = _steps(results, "sequential[ep2]")
    assert sorted(resumed) == [3, 4]
    # bf16 trains near fp32 (measured: 2e-5 relative in the loss, 1e-3 in the grad norm), and
    # the fp32 continuation from its checkpoint stays as near; an untrained start would be 4% off.
    _close(bf16, fp32, (1, 2), rtol=5e-3)
    _close(resumed, fp32, (3, 4), rtol=5e-3)
