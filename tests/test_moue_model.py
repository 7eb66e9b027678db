"""The MoUE model on 2 CPU processes: every parallel layout matches one process.

Rotational MoUE (4 layers, pool of 8, windows of 4 with stride 2, top-2, trajectory state d=8,
UELB), 3 Adam steps with Megatron DDP and the distributed optimizer. Under PP=2 the windows and
the trajectory state cross the stage boundary, and both stages hold replicas of the pool.
Cases live in tests/cases/moue_model.py.
"""

import pytest
import torch

from tests.distributed import launch, max_rel
from tests.equivalence import LAYOUTS

pytestmark = pytest.mark.compat

CASES = "tests.cases.moue_model"
RTOL = 1e-5


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
            assert max_rel(run[key], reference[key]) < RTOL, (layout, rank, key, run)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_released_architecture_options_train_alike_under_every_layout(layout):
    """QK norm, QKV bias, tied embeddings, RoPE base, norm epsilon, SwiGLU, GQA, a gated shared
    expert and softmax-before-top-k together: every layout equals one process."""
    reference = launch(CASES, 1)["moue_options[single]"][0]
    assert reference["losses"][0] != reference["losses"][-1]
    for rank, run in enumerate(launch(CASES, 2)[f"moue_options[{layout}]"]):
        for key in ("losses", "grad_norms", "balance_loss"):
            assert max_rel(run[key], reference[key]) < RTOL, (layout, rank, key, run)


def test_released_architecture_options_reach_the_modules():
    run = launch(CASES, 1)["options_reach_the_modules"][0]
    assert run["head_dim"] == 12  # model.head_dim, not hidden / heads = 8
    assert run["inv_freq_1"] == pytest.approx(1e6 ** (-2 / run["head_dim"]), rel=1e-6)
    assert run["final_norm_eps"] == 1e-6
    assert run["q_norm_size"] == run["head_dim"]  # one norm over each head's dimension
    assert run["qkv_bias"] and run["output_weight_is_embedding"]
    assert run["shared_gate"] == [1, run["hidden"]]


def test_pool_replicas_stay_bit_identical_across_stages():
    for run in launch(CASES, 2)["moue_train[pp2]"]:
        assert run["replicas_identical"] is True


@pytest.mark.parametrize("layout,nproc", [("single", 1), ("ep2", 2), ("swiglu_ep2", 2)])
def test_standard_topology_is_megatron_moe(layout, nproc):
    """Same weights: the standard topology's logits and gradients are Megatron-Core's MoE's
    (N=4 experts per layer vs a pool of 16; per_layer balance x L vs Megatron's aux loss), with
    GELU and with SwiGLU experts."""
    for run in launch(CASES, nproc)[f"standard_vs_megatron[{layout}]"]:
        assert run["logits"] <= 1e-5 * run["logits_scale"], run
        assert run["dense_grads"] <= 1e-5 and run["dense_params_compared"] >= 20, run
        assert run["expert_grads"] <= 1e-5 * run["grad_scale"], run
    if nproc == 2:  # pool expert e lives on EP rank e mod 2
        ranks = launch(CASES, nproc)[f"standard_vs_megatron[{layout}]"]
        assert [r["placement"] for r in ranks] == [list(range(0, 16, 2)), list(range(1, 16, 2))]


def test_pool_expert_gradient_is_the_sum_over_its_layers():
    run = launch(CASES, 1)["pool_grad_sum"][0]
    assert run["max_diff"] <= 1e-6 * run["scale"], run
    assert run["layers_reaching_expert"] == run["exposure"] == [2] * 8


def test_zero_trajectory_state_reproduces_the_stateless_router_exactly():
    run = launch(CASES, 1)["state_off_equals_zero_state"][0]
    assert run == {"logits_equal": True, "grads_equal": True}


def test_routing_of_a_layer_depends_on_the_previous_layers_choices_through_the_state():
    with_state = launch(CASES, 1)["state_carries_choices[d8]"][0]
    without = launch(CASES, 1)["state_carries_choices[d0]"][0]
    assert with_state["layer0_choices_changed"] and without["layer0_choices_changed"]
    assert with_state["layer1_logits_changed"]
    assert not without["layer1_logits_changed"]  # expert outputs are zero: only the state links


@pytest.mark.parametrize("layout", ["ep2", "pp2"])
def test_aux_free_shared_expert_sigmoid_ep_balance_variant_matches_and_moves_the_biases(layout):
    reference = launch(CASES, 1)["moue_variant[single]"][0]
    assert all(loss > 0 for loss in reference["ep_balance_loss"])  # the term is on
    # Each step moves every bias by +-rate (fp32): whole multiples of it, some non-zero.
    for key, rate in (("bias", 0.05), ("ep_bias", 0.03)):
        nudges = [abs(b) for b in torch.tensor(reference[key]).flatten().tolist()]
        assert max(nudges) > 0 and all(abs(n / rate - round(n / rate)) < 1e-4 for n in nudges)
    ep_bias = torch.tensor(reference["ep_bias"])  # [L, E]: expert e in group e mod 2
    assert torch.equal(ep_bias[:, 0::2], ep_bias[:, :1].expand(-1, 4))
    for run in launch(CASES, 2)[f"moue_variant[{layout}]"]:
        assert max_rel(run["losses"], reference["losses"]) < RTOL
        assert max_rel(run["grad_norms"], reference["grad_norms"]) < RTOL
        # counts summed over ranks (data shards, stages): the same nudges everywhere
        assert run["bias"] == reference["bias"] and run["ep_bias"] == reference["ep_bias"]
        assert max_rel(run["ep_balance_loss"], reference["ep_balance_loss"]) < RTOL


@pytest.mark.parametrize("name", ["rotational_state", "standard_no_state",
                                  "dense_between_shared_gqa_layernorm", "dense_baseline",
                                  "released_options", "released_options_layernorm_dense"])
def test_dry_run_parameter_count_is_the_built_models(name):
    run = launch(CASES, 1)[f"param_count[{name}]"][0]
    assert run["dry_run"] == run["built"]


def test_per_step_topk_expert_mask_and_layer_skip():
    run = launch(CASES, 1)["elastic_hooks"][0]
    assert run["counts"][0] == run["counts"][5] == 0  # masked experts are never chosen
    assert run["total"] == 3 * 2 * 16 * 1  # 3 routed layers x 32 tokens x top-1


@pytest.mark.parametrize("layout", ["ep2", "pp2", "tp2_ep2"])
def test_a_reduced_submodel_trains_alike_under_every_layout(layout):
    """Layer 2 skipped, 4 of 8 pool experts, top-1 (set once, read by Megatron's dispatchers)."""
    reference = launch(CASES, 1)["moue_submodel[single]"][0]
    run = launch(CASES, 2)[f"moue_submodel[{layout}]"][0]
    assert reference["losses"][0] != reference["losses"][-1]
    for key in ("losses", "grad_norms", "balance_loss"):
        assert max_rel(run[key], reference[key]) < RTOL, (key, run[key], reference[key])
