"""Step figures from known counts (moue.training.metrics)."""

import pytest
import torch

from moue.training.metrics import ep_balance_figures, ep_rank_loads, load_figures

pytestmark = pytest.mark.compat


def test_tokens_per_ep_rank_follow_the_placement_e_mod_ep():
    """Pool expert e sits on EP rank e mod EP: layer 0 sends everything to experts 0 and 2,
    both on rank 0 of 2; layer 1 is even."""
    loads_LE = torch.tensor([[4.0, 0, 4, 0], [1, 1, 1, 1]])
    assert ep_rank_loads(loads_LE, 2).tolist() == [[8.0, 0.0], [2.0, 2.0]]
    figures = ep_balance_figures(loads_LE, 2)
    assert figures["ep_load_max_over_mean_by_layer"] == [2.0, 1.0]
    assert figures["ep_load_max_over_mean"] == 1.5
    assert ep_balance_figures(loads_LE, 4)["ep_load_max_over_mean_by_layer"] == [2.0, 1.0]


def test_pool_load_figures():
    figures = load_figures(torch.tensor([[4.0, 0, 4, 0], [1, 1, 1, 1]]))  # pool: 5, 1, 5, 1
    assert figures["load_max_over_mean"] == pytest.approx(5 / 3)
    assert figures["load_cv"] == pytest.approx(2 / 3)
