"""Balance losses: UELB's defining properties, against Megatron-Core's Switch loss."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

from moue.model.balance import (
    BALANCES,
    build_balance,
    group_switch_loss,
    switch_loss,
    uelb_loss,
)
from moue.model.topology import build_topology

pytestmark = pytest.mark.compat


def _topo(topology="rotational", **numbers):
    return build_topology(topology, num_layers=4, **numbers)


def _random_routing(mask_LE, seed=0):
    """Per-layer assignment fractions f and mean probabilities P, zero outside each window."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(mask_LE.shape, generator=g) * mask_LE
    p = torch.rand(mask_LE.shape, generator=g) * mask_LE
    return f / f.sum(1, keepdim=True), p / p.sum(1, keepdim=True)


@pytest.mark.parametrize("topology", [
    dict(topology="rotational", num_experts=16, window=8, stride=4),
    dict(topology="rotational", num_experts=10, window=4, stride=3),  # uneven exposure
    dict(topology="standard", num_experts=16),
    dict(topology="full", num_experts=8),
])
def test_uelb_is_one_under_uniform_routing(topology):
    t = _topo(topk=2, **topology)
    q_LE = t.mask_LE.float() / t.window
    loads_E = q_LE.mean(0)  # F under uniform routing
    assert uelb_loss(loads_E, q_LE, t.uniform_share_E).item() == pytest.approx(1.0, abs=1e-6)


def test_uelb_is_the_mean_switch_loss_under_the_standard_topology():
    t = _topo(topology="standard", num_experts=16, topk=2)
    f_LE, p_LE = _random_routing(t.mask_LE)
    uelb = uelb_loss(f_LE.mean(0), p_LE, t.uniform_share_E)
    per_layer = []
    for l in range(4):
        window = t.eligible(l)
        tokens, topk = 1000, 2
        # Megatron's own Switch loss for layer l over its N experts (coefficient 1).
        megatron = switch_load_balancing_loss_func(
            probs=p_LE[l, window].expand(tokens, -1), tokens_per_expert=f_LE[l, window] * tokens * topk,
            total_num_tokens=tokens, topk=topk, num_experts=len(window), moe_aux_loss_coeff=1.0)
        assert megatron.item() == pytest.approx(switch_loss(f_LE[l, window], p_LE[l, window], 4).item(),
                                                rel=1e-5)
        per_layer.append(megatron)
    assert uelb.item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-5)


def test_uelb_layer_terms_sum_to_the_pool_loss_and_only_probabilities_carry_gradient():
    t = _topo(topology="rotational", num_experts=16, window=8, stride=4, topk=2)
    balance = build_balance("uelb", t, coeff=1.0, rate=0.0)
    f_LE, p_LE = _random_routing(t.mask_LE, seed=1)
    balance.loads_E.copy_(f_LE.mean(0))  # F of the previous step
    p_LE.requires_grad_()
    tokens = 64
    total = sum(balance.layer_loss(p_LE[l] * tokens, tokens, None) for l in range(4))
    expected = uelb_loss(balance.loads_E, p_LE, t.uniform_share_E)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    # d/dP_le = F_e / (Q_e * L): a layer is pushed off what the pool as a whole overloads.
    weight_E = balance.loads_E / (t.uniform_share_E * 4)
    assert torch.allclose(p_LE.grad, weight_E.expand(4, -1))


def test_end_step_takes_the_summed_counts_as_loads_and_aux_free_nudges_toward_exposure():
    t = _topo(topology="rotational", num_experts=8, window=4, stride=2, topk=2)
    counts = torch.zeros(4, 8)  # per MoE layer: the pool's column sums are what F reads
    counts[0, 0], counts[2, 0], counts[3, 7] = 5.0, 3.0, 8.0
    uelb = build_balance("uelb", t, coeff=1.0, rate=0.0)
    assert torch.equal(uelb.loads_E, t.uniform_share_E)  # F = Q at step 0
    uelb.count(1, torch.ones(3, 8, dtype=torch.bool))
    assert uelb.counts_E.tolist() == [3.0] * 8 and uelb.counts_LE[1].tolist() == [3.0] * 8
    uelb.end_step(counts)
    assert uelb.loads_E.tolist() == [0.5, 0, 0, 0, 0, 0, 0, 0.5] and uelb.counts_E.sum() == 0
    aux = build_balance("aux_free", t, coeff=0.0, rate=0.1)
    aux.end_step(counts)
    assert aux.bias_E[0] == pytest.approx(-0.1) and aux.bias_E[1] == pytest.approx(0.1)
    assert aux.selection_bias(2) is aux.bias_E and uelb.selection_bias(2) is None


def test_registry():
    assert sorted(BALANCES) == ["aux_free", "none", "per_layer", "uelb"]


def test_ep_group_loss_is_one_when_even_over_ranks_and_groups_experts_by_rank():
    """Expert e sits on EP rank e mod G: the loss is 1 when a layer's tokens and probability are
    even over the ranks (whatever their spread inside a rank), G when all go to one rank."""
    groups, tokens = 4, 100
    even = torch.tensor([10.0, 10, 10, 10, 15, 15, 15, 15])  # experts 0..7; each rank 25 tokens
    probs = even.clone()
    assert group_switch_loss(even, probs, tokens, groups).item() == pytest.approx(1.0)
    one_rank = torch.tensor([50.0, 0, 0, 0, 50, 0, 0, 0])  # experts 0 and 4: both on rank 0
    assert group_switch_loss(one_rank, one_rank.clone(), tokens, groups).item() == pytest.approx(4.0)


def test_ep_balance_is_off_by_default_and_per_layer_when_on():
    t = _topo(topology="rotational", num_experts=8, window=4, stride=2, topk=2)
    off = build_balance("uelb", t, 0.01, 0.0)
    assert off.ep_layer_loss(torch.ones(8), 8, torch.ones(8)) is None
    on = build_balance("uelb", t, 0.01, 0.0, ep_coeff=0.1, ep_groups=2)
    counts = torch.tensor([4.0, 0, 4, 0, 0, 0, 0, 0])  # a layer's tokens all on rank 0
    assert on.ep_layer_loss(counts, 8, counts).item() == pytest.approx(2.0 / 4)  # G / L


def test_ep_selection_bias_moves_each_layer_toward_even_groups_and_only_while_on():
    """b_lg += rate * sign(n_l * s_lg - n_lg): per MoE layer and rank group (expert e in group
    e mod G), toward the group's share of the layer's window; every expert of a group alike."""
    t = _topo(topology="rotational", num_experts=8, window=4, stride=2, topk=2)
    balance = build_balance("uelb", t, 0.01, 0.0, ep_groups=2, ep_rate=0.1)
    counts = torch.zeros(4, 8)
    counts[0, 0], counts[0, 1] = 6.0, 2.0  # layer 0 (experts 0-3): group 0 has 6 of 8
    counts[1, 2:6] = 2.0                   # layer 1: even over the groups
    balance.end_step(counts)               # layers 2, 3 routed nothing: they keep their bias
    expected = torch.zeros(4, 8)
    expected[0] = torch.tensor([-0.1, 0.1] * 4)
    assert torch.allclose(balance.bias_LE, expected)
    assert torch.equal(balance.selection_bias(0), balance.bias_LE[0])
    assert balance.largest_selection_bias() == pytest.approx(0.1)
    # an elastic sub-model keeping experts 0, 2, 3 of layer 0: group 0's share is 2/3
    mask = t.mask_LE.clone()
    mask[0, 1], mask[1:] = False, False
    balance.set_eligibility(mask)
    counts = torch.zeros(4, 8)
    counts[0, 0], counts[0, 3] = 2.0, 1.0  # 2 of 3 on group 0: even for this sub-model
    balance.end_step(counts)
    assert torch.allclose(balance.bias_LE, expected)
    off = build_balance("uelb", t, 0.01, 0.0, ep_groups=2)
    off.end_step(counts)
    assert off.selection_bias(0) is None and not off.bias_LE.any()


@pytest.mark.parametrize("score_function, pre_softmax, scaling", [
    ("softmax", False, None), ("softmax", True, None), ("sigmoid", False, None),
    ("sigmoid", False, 2.5), ("softmax", False, 1.5)])
def test_biased_selection_routes_as_megatron_with_a_zero_bias_and_picks_by_score_plus_bias(
        score_function, pre_softmax, scaling):
    """The selection-bias path gives Megatron's own gates and map when the bias is zero, and
    with a bias chooses the top-k of score + bias while the gates stay the router's scores."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from moue.model.router import MASKED, _biased_topk
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    logits[:, 6:] = MASKED  # outside the window
    probs, routing = topk_routing_with_score_function(
        logits, 2, use_pre_softmax=pre_softmax, scaling_factor=scaling,
        score_function=score_function)
    biased_probs, biased_map = _biased_topk(logits, torch.zeros(8), 2, score_function,
                                            pre_softmax, scaling)
    assert torch.equal(biased_map, routing)
    torch.testing.assert_close(biased_probs, probs, rtol=1e-6, atol=1e-7)
    bias = torch.tensor([0.0, 0, 0, 0, 0, 5.0, 9.0, 9.0])  # expert 5 always, 6-7 never
    biased_probs, biased_map = _biased_topk(logits, bias, 2, score_function, pre_softmax, scaling)
    assert biased_map[:, 5].all() and not biased_map[:, 6:].any()
    assert biased_map.sum(dim=1).eq(2).all()
    chosen = biased_map.nonzero()[:, 1].view(-1, 2)
    if score_function == "softmax" and not pre_softmax:
        gates = torch.softmax(logits.gather(1, chosen), dim=-1)
    elif score_function == "softmax":
        gates = torch.softmax(logits, dim=-1).gather(1, chosen)
    else:
        gates = torch.sigmoid(logits).gather(1, chosen)
        gates = gates / gates.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(biased_probs.gather(1, chosen), gates * (scaling or 1.0))
