"""The MoUE model on 2 CPU processes: every parallel layout matches one process.

Rotational MoUE (4 layers, pool of 8, windows of 4 with stride 2, top-2, trajectory state d=8,
UELB), 3 Adam steps with Megatron DDP and the distributed optimizer. Under PP=2 the windows and
the trajectory state cross the stage boundary, and both stages hold replicas of the pool.
Cases live in tests/cases/moue_model.py.
"""

import pytest

from tests.distributed import launch
from tests.megatron_gpt import LAYOUTS

pytestmark = pytest.mark.compat

CASES = "tests.cases.moue_model"
RTOL = 1e-5


def _max_rel(values, reference):
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference, strict=True))


@pytest.fixture(scope="module")
def reference():
    return launch(CASES, 1)["moue_train[single]"][0]


def test_reference_trains_and_uelb_starts_at_one(reference):
    assert len(set(reference["losses"])) == 3 and 4.0 < reference["losses"][0] < 6.0
    # Step 0 uses F = Q, so UELB is exactly 1; later steps use the previous step's loads.
    assert reference["balance_loss"][0] == pytest.approx(1.0, abs=1e-6)
    assert all(b >= 1.0 - 1e-6 for b in reference["balance_loss"][1:])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, reference):
    for rank, run in enumerate(launch(CASES, 2)[f"moue_train[{layout}]"]):
        for key in ("losses", "grad_norms", "balance_loss"):
            assert _max_rel(run[key], reference[key]) < RTOL, (layout, rank, key, run)


def test_pool_replicas_stay_bit_identical_across_stages():
    for run in launch(CASES, 2)["moue_train[pp2]"]:
        assert run["replicas_identical"] is True
