"""Topologies: eligibility masks and their derived figures."""

import pytest
import torch

from moue.model.topology import TOPOLOGIES, build_topology
from parallel.errors import UserError

pytestmark = pytest.mark.compat


def _topo(layers=4, topology="rotational", **numbers):
    return build_topology(topology, num_layers=layers, **numbers)


def test_rotational_windows_overlap_by_w_minus_s_and_wrap_around_the_ring():
    t = _topo(num_experts=16, topology="rotational", window=8, stride=4, topk=2)
    assert t.eligible(0).tolist() == list(range(8))
    assert t.eligible(3).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]  # 12..19 mod 16
    for l in range(3):
        assert (t.mask_LE[l] & t.mask_LE[l + 1]).sum() == 8 - 4
    assert t.exposure_E.tolist() == [2] * 16
    assert (t.virtual_width, t.reuse_factor, t.window) == (32, 2.0, 8)


def test_standard_is_block_diagonal_with_reuse_one():
    t = _topo(num_experts=16, topology="standard", topk=2)
    assert [t.eligible(l).tolist() for l in range(4)] == [
        list(range(l * 4, l * 4 + 4)) for l in range(4)]
    assert t.exposure_E.tolist() == [1] * 16 and (t.virtual_width, t.reuse_factor) == (16, 1.0)


def test_rotational_with_w_equal_s_and_e_equal_ln_is_standard():
    rot = _topo(num_experts=16, topology="rotational", window=4, stride=4, topk=2)
    std = _topo(num_experts=16, topology="standard", topk=2)
    assert torch.equal(rot.mask_LE, std.mask_LE)


def test_full_reaches_everything():
    t = _topo(num_experts=8, topology="full", topk=2)
    assert t.exposure_E.tolist() == [4] * 8 and t.reuse_factor == 4.0


def test_uniform_share_is_exposure_normalised_and_sums_to_one():
    t = _topo(num_experts=10, topology="rotational", window=4, stride=3, topk=2)  # uneven exposure
    q = t.uniform_share_E
    assert q.sum().item() == pytest.approx(1.0)
    assert torch.allclose(q, t.exposure_E / t.exposure_E.sum())


def test_bad_shapes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="moe.num_experts=10: the standard topology.*multiple of 4"):
        _topo(num_experts=10, topology="standard", topk=2)
    with pytest.raises(ValueError, match="moe.window=20: the window cannot be larger than the pool"):
        _topo(num_experts=16, topology="rotational", window=20, stride=4, topk=2)
    with pytest.raises(ValueError, match="moe.topk=5: larger than the window of 4"):
        _topo(num_experts=16, topology="standard", topk=5)


def test_registry_lists_the_four_topologies():
    assert sorted(TOPOLOGIES) == ["explicit", "full", "rotational", "standard"]


def test_explicit_topology_is_the_listed_windows_and_refuses_bad_lists():
    topo = build_topology("explicit", num_layers=2, num_experts=6, topk=2,
                          eligibility=[[0, 1, 5], [2, 3, 4]])
    assert topo.eligible(0).tolist() == [0, 1, 5] and topo.window == 3
    assert topo.exposure_E.tolist() == [1] * 6
    for rows, message in (([[0, 1, 2]], "one list of pool ids per MoE layer (2 lists)"),
                          ([[0, 1, 9], [2, 3, 4]], "moe.eligibility[0]=[0, 1, 9]: must list distinct"),
                          ([[0, 1], [2, 3, 4]], "every layer needs a window of the same size")):
        with pytest.raises(UserError) as err:
            build_topology("explicit", num_layers=2, num_experts=6, topk=2, eligibility=rows)
        assert message in str(err.value)
