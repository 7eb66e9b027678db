"""Megatron-Core itself on 2 CPU processes with gloo, before any MoUE code.

- TP=2 column/row-parallel linear equals nn.Linear (forward and gradients), with and without
  sequence parallelism.
- A small GPTModel with MoE, trained 3 steps with Megatron DDP and the distributed optimizer,
  gives the same loss history and grad norms under TP=2 (+SP), EP=2, PP=2, TP=2xEP=2 and DP=2
  as in one process.
- Each CPU adaptation is needed: switched off alone, the training step fails in the Megatron-Core
  file the adaptation names, with the symptom it names.

Cases live in tests/cases/megatron_equivalence.py; one torchrun per world size runs them all.
"""

import pytest

from parallel import cpu_backend
from tests.distributed import launch, max_rel
from tests.equivalence import LAYOUTS

pytestmark = pytest.mark.compat

CASES = "tests.cases.megatron_equivalence"
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return launch(CASES, 1)["gpt_train[single]"][0]


def test_reference_run_trains(reference):
    losses = reference["losses"]
    assert len(losses) == 3 and len(set(losses)) == 3  # three distinct steps, not a constant
    assert all(4.0 < loss < 6.0 for loss in losses)  # ~ln(vocab=128)=4.85 on random tokens
    assert all(n > 0 for n in reference["grad_norms"])


@pytest.mark.parametrize("layout", [*LAYOUTS, "dp2_plain_optimizer"])
def test_layout_matches_one_process(layout, reference):
    for rank, run in enumerate(launch(CASES, 2)[f"gpt_train[{layout}]"]):
        assert max_rel(run["losses"], reference["losses"]) < RTOL, (layout, rank, run)
        assert max_rel(run["grad_norms"], reference["grad_norms"]) < RTOL, (layout, rank, run)


def test_fused_weight_gradients_train_as_unfused(reference):
    """Megatron's linears with gradient-accumulation fusion (apex's wgrad kernel, on CPU its
    stand-in in parallel.cpu_backend) train as without it."""
    fused = launch(CASES, 1)["gpt_train[single_fused]"][0]
    assert max_rel(fused["losses"], reference["losses"]) < RTOL, fused
    assert max_rel(fused["grad_norms"], reference["grad_norms"]) < RTOL, fused


@pytest.mark.parametrize("sp", ["no_sp", "sp"])
def test_tensor_parallel_linear_equals_nn_linear(sp):
    for errors in launch(CASES, 2)[f"tp_mlp[{sp}]"]:
        tol = 1e-6 * errors.pop("scale")
        assert all(e <= tol for e in errors.values()), errors


@pytest.mark.parametrize("name", list(cpu_backend.ADAPTATIONS))
def test_each_adaptation_is_needed(name):
    nproc = 2 if name == "alltoall_splits" else 1
    outcome = launch(CASES, nproc)[f"without[{name}]"][0]
    if not outcome["applies"]:
        pytest.skip(f"the installed megatron-core needs no '{name}' adaptation")
    adaptation = cpu_backend.ADAPTATIONS[name]
    assert outcome["error"] is not None, f"training ran without the '{name}' adaptation"
    assert adaptation.symptom in outcome["error"], outcome
    assert outcome["megatron_file"] and outcome["megatron_file"] in adaptation.call_site, outcome
