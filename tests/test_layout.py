"""ParallelLayout: degree arithmetic and every rejection, with fake world sizes (no processes)."""

import pytest

from parallel.layout import ParallelLayout

pytestmark = pytest.mark.compat

MODEL = dict(num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             num_experts=16, expert_ffn_hidden_size=32, seq_length=128)


@pytest.mark.parametrize("world,tp,pp,ep,dp,edp,etp", [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 2, 1, 1, 1, 1, 2),   # ep=1: etp follows tp
    (2, 1, 1, 2, 2, 1, 1),
    (2, 1, 2, 1, 1, 1, 1),
    (2, 2, 1, 2, 1, 1, 1),   # ep>1: etp defaults to 1
    (8, 2, 2, 2, 2, 2, 1),
    (16, 2, 2, 4, 4, 2, 1),
])
def test_derived_degrees(world, tp, pp, ep, dp, edp, etp):
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    assert (layout.dp, layout.edp, layout.etp) == (dp, edp, etp)
    assert layout.sequence_parallel == (tp > 1)
    assert layout.tp * layout.pp * layout.dp == world
    assert layout.etp * layout.ep * layout.pp * layout.edp == world


def test_tp_larger_than_world_is_rejected_with_alternatives():
    with pytest.raises(ValueError) as err:
        ParallelLayout(world_size=2, tp=4)
    msg = str(err.value)
    assert "parallel.tp=4" in msg and "world size 2" in msg and "[1, 2]" in msg


def test_ep_not_dividing_experts_is_rejected():
    layout = ParallelLayout(world_size=6, ep=3)
    with pytest.raises(ValueError) as err:
        layout.check_model(**MODEL)
    msg = str(err.value)
    assert "parallel.ep=3" in msg and "moe.num_experts=16" in msg
    assert "Valid values: 1, 2" in msg  # divisors of 16 that also fit a world of 6


def test_pp_not_dividing_layers_is_rejected():
    layout = ParallelLayout(world_size=3, pp=3)
    with pytest.raises(ValueError) as err:
        layout.check_model(**MODEL)
    msg = str(err.value)
    assert "parallel.pp=3" in msg and "model.num_layers=4" in msg and "Valid values: 1" in msg


@pytest.mark.parametrize("overrides,field", [
    (dict(num_attention_heads=5), "model.num_attention_heads=5"),
    (dict(num_query_groups=1), "model.num_query_groups=1"),
    (dict(ffn_hidden_size=63), "model.ffn_hidden_size=63"),
    (dict(seq_length=127), "model.seq_length=127"),
])
def test_tensor_parallel_dimension_checks(overrides, field):
    layout = ParallelLayout(world_size=2, tp=2)
    with pytest.raises(ValueError, match="parallel.tp=2") as err:
        layout.check_model(**{**MODEL, **overrides})
    assert field in str(err.value)


def test_expert_tensor_parallel_dimension_check():
    layout = ParallelLayout(world_size=2, tp=2, ep=1)  # etp=2
    with pytest.raises(ValueError, match="moe.expert_ffn_hidden_size=33"):
        layout.check_model(**{**MODEL, "expert_ffn_hidden_size": 33})


def test_valid_model_passes_every_two_process_layout():
    for tp, pp, ep in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 2)]:
        layout = ParallelLayout(world_size=2, tp=tp, pp=pp, ep=ep)
        assert layout.check_model(**MODEL) is layout


def test_expert_layout_must_fit_world():
    with pytest.raises(ValueError, match=r"etp=1 x parallel.ep=4 x parallel.pp=1 = 4"):
        ParallelLayout(world_size=2, ep=4)


def test_ep1_with_etp_below_tp_is_rejected():
    # Megatron-Core would reduce expert grads over the dense DP group only: partial gradients.
    with pytest.raises(ValueError, match="parallel.etp=1 < parallel.tp=2 with parallel.ep=1"):
        ParallelLayout(world_size=2, tp=2, ep=1, etp=1)


@pytest.mark.parametrize("field,value", [("tp", 0), ("pp", -1), ("ep", 1.5), ("etp", True)])
def test_non_positive_or_non_integer_degrees(field, value):
    with pytest.raises(ValueError, match=f"parallel.{field}="):
        ParallelLayout(world_size=2, **{field: value})


def test_describe_is_plain_numbers():
    assert ParallelLayout(world_size=8, tp=2, pp=2, ep=2).describe() == {
        "world_size": 8, "tp": 2, "pp": 2, "ep": 2, "etp": 1, "dp": 2, "edp": 2,
        "sequence_parallel": True}
