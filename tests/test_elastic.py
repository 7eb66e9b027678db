"""Elastic training's pure parts: the config section, the schedule, sub-model sets and the
family, the sub-model's sizes and its export mapping; and every bad input of the section and of
--submodel (the training, evaluation and export runs are in test_elastic_commands.py)."""

import pytest
import torch

from moue.config import load_config
from moue.elastic.apply import effective_mask
from moue.elastic.extract import submodel_state, submodel_tree
from moue.elastic.microbatch import MicrobatchSchedule, full_microbatches, split_topk
from moue.elastic.schedule import Schedule
from moue.elastic.submodel import (
    family,
    full,
    nested_experts,
    parse,
    random_experts,
    spread_layers,
)
from moue.model.size import param_counts
from parallel.errors import UserError

pytestmark = pytest.mark.compat

TINY = "examples/configs/tiny_cpu.yaml"  # 4 layers, a pool of 16, windows of 8, stride 4, k 2


def tiny(*overrides):
    return load_config(TINY, ["elastic.enabled=true", *overrides])


def test_enabled_alone_gives_ernie_defaults():
    cfg = tiny()
    e, c = cfg.elastic, cfg.elastic_choices()
    assert (e.layers_full_prob, e.experts_full_prob, e.topk_full_prob) == (0.75, 0.8, 0.8)
    assert (c.layers, c.experts, c.topk) == ((3,), (8,), (1,))  # 3/4 depth, half width, k < 2
    assert (e.layers_policy, e.experts_policy, e.coactivation_prob, e.sharpen_coeff) == (
        "spread", "random", 0.0, 0.0)
    assert not load_config(TINY).elastic.enabled  # off by default


def test_schedule_depends_on_seed_and_step_only_and_follows_the_probabilities():
    cfg = tiny()
    one, two = (Schedule(cfg.elastic, cfg.elastic_choices(), 1234) for _ in range(2))
    draws = [one.draw(t) for t in range(400)]
    assert draws[::-1] == [two.draw(t) for t in reversed(range(400))]  # any order, no state
    assert [d.submodel for d in draws] != [Schedule(cfg.elastic, cfg.elastic_choices(), 7)
                                           .draw(t).submodel for t in range(400)]
    full_depth = sum(len(d.submodel.layers) == 4 for d in draws) / 400
    full_width = sum(len(d.submodel.experts) == 16 for d in draws) / 400
    full_k = sum(d.submodel.topk == 2 for d in draws) / 400
    assert abs(full_depth - 0.75) < 0.07 and abs(full_width - 0.8) < 0.06 and abs(full_k - 0.8) < 0.06
    for d in draws:  # width per block of stride 4: 2 of each block when halved
        if len(d.submodel.experts) == 8:
            assert sorted(e // 4 for e in d.submodel.experts) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_depth_sets_keep_first_and_last_and_are_evenly_spaced():
    assert spread_layers(16, 12) == (0, 1, 3, 4, 5, 7, 8, 10, 11, 12, 14, 15)
    assert spread_layers(4, 3) == (0, 2, 3) and spread_layers(4, 2) == (0, 3)
    assert spread_layers(5, 1) == (0,) and spread_layers(4, 4) == (0, 1, 2, 3)
    cfg = tiny("elastic.layers=[2]", "elastic.layers_full_prob=0", "elastic.layers_policy=random")
    schedule = Schedule(cfg.elastic, cfg.elastic_choices(), 1)
    assert {schedule.draw(t).submodel.layers for t in range(50)} == {(0, 3)}
    cfg = load_config(TINY, ["model.num_layers=8", "elastic.layers=[4]",
                             "elastic.layers_full_prob=0", "elastic.layers_policy=random"])
    sets = {Schedule(cfg.elastic, cfg.elastic_choices(), 1).draw(t).submodel.layers
            for t in range(50)}
    assert len(sets) > 5 and all(s[0] == 0 and s[-1] == 7 and len(s) == 4 for s in sets)


def test_width_sets_keep_every_windows_share():
    assert nested_experts(16, 4, 8) == (0, 1, 4, 5, 8, 9, 12, 13)
    assert set(nested_experts(16, 4, 4)) < set(nested_experts(16, 4, 8))  # nested
    kept = random_experts(16, 4, 8, torch.Generator().manual_seed(3))
    topology = tiny().topology()
    for layer in range(4):
        window = set(topology.eligible(layer).tolist())
        assert len(window & set(kept)) == 4  # half of each window of 8


def test_family_enumerates_every_combination_largest_first():
    cfg = tiny("elastic.layers=[2, 3]", "elastic.topk=[1]")
    labels = [s.label for s in family(cfg.elastic_choices())]
    assert len(labels) == 3 * 2 * 2 and labels[0] == "layers=4,experts=16,topk=2"
    assert labels[-1] == "layers=2,experts=8,topk=1" and len(set(labels)) == 12


def test_submodel_sizes_and_effective_eligibility():
    cfg = tiny()
    sub = parse("layers=3,experts=8,topk=1", cfg.elastic_choices(), 8)
    assert sub.layers == (0, 2, 3) and sub.experts == nested_experts(16, 4, 8)
    mask = effective_mask(cfg.topology(), 1, sub)
    assert mask[1].sum() == 0 and (mask.sum(dim=1)[[0, 2, 3]] == 4).all()
    whole, part = param_counts(cfg.model, cfg.moe, cfg.topology()), param_counts(
        cfg.model, cfg.moe, cfg.topology(), sub)
    assert part["pool"] * 2 == whole["pool"] and part["attention"] * 4 == whole["attention"] * 3
    assert part["routers"] * 8 == whole["routers"] * 3  # 3 layers x 4 rows, not 4 x 8
    assert param_counts(cfg.model, cfg.moe, cfg.topology(), full(cfg.elastic_choices())) == whole


def test_export_maps_layers_experts_router_rows_and_writes_an_explicit_topology():
    cfg = tiny()
    sub = parse("layers=3,experts=8", cfg.elastic_choices(), 8)  # layers 0, 2, 3
    tree = submodel_tree(cfg, sub)
    # kept pool ids 0,1,4,5 | 8,9,12,13 become 0..7; layer 3's window (12..15, 0..3) keeps 4 of them
    assert tree["moe"]["eligibility"] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 6, 7]]
    exported = load_config(None, [], base=tree)
    assert exported.topology().name == "explicit" and exported.model.num_layers == 3
    state = {"decoder.layers.2.mlp.router.weight": torch.arange(8.0)[:, None],
             "decoder.layers.1.mlp.router.weight": torch.zeros(8, 1),
             "decoder.expert_pool.local_experts.5.linear_fc1.weight": torch.ones(1),
             "decoder.expert_pool.local_experts.2.linear_fc1.weight": torch.ones(1),
             "decoder.expert_embedding.weight": torch.arange(16.0)[:, None],
             "decoder.pool_balance.loads_E": torch.zeros(16),
             "output_layer.weight": torch.ones(2)}
    fresh = {"decoder.pool_balance.loads_E": torch.full((8,), 0.125)}
    out = submodel_state(state, cfg, sub, fresh)
    # layer 2 sees pool ids 8..15; the kept ones are 8, 9, 12, 13: rows 0, 1, 4, 5
    assert out["decoder.layers.1.mlp.router.weight"].flatten().tolist() == [0, 1, 4, 5]
    assert "decoder.expert_pool.local_experts.2.linear_fc1.weight" not in out  # pool id 2 dropped
    assert "decoder.expert_pool.local_experts.3.linear_fc1.weight" in out  # pool id 5 -> 3
    assert out["decoder.expert_embedding.weight"].flatten().tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert out["decoder.pool_balance.loads_E"] is fresh["decoder.pool_balance.loads_E"]
    assert len([k for k in out if k.startswith("decoder.layers.")]) == 1  # old layer 1 dropped


@pytest.mark.parametrize("override,message", [
    ("elastic.layers=[5]", "elastic.layers=[5]: every depth must be between 1 and model.num_layers=4"),
    ("elastic.layers=[0]", "elastic.layers=[0]: must be a list of positive integers"),
    ("elastic.experts=[6]", "elastic.experts=[6]: a width must be a multiple of the 4 blocks of 4"),
    ("moe.topk=3 elastic.experts=[4]", "keep at least moe.topk=3 experts in every window of 8 (e.g. 8, 12, 16)"),
    ("elastic.experts=[32]", "elastic.experts=[32]: every width must be at most moe.num_experts=16"),
    ("elastic.topk=[9]", "elastic.topk=[9]: every top-k must be between 1 and the window (8"),
    ("elastic.topk=[5]", "elastic.topk=[5]: a top-k must fit the narrowest window of the sub-models (4"),
    ("elastic.coactivation_prob=0.5 elastic.k_ideal=9", "elastic.k_ideal=9: must be above moe.topk=2"),
    ("elastic.layers_full_prob=1.5", "elastic.layers_full_prob=1.5: must be a probability in [0, 1]"),
    ("elastic.coactivation_prob=-0.1", "elastic.coactivation_prob=-0.1: must be a probability"),
    ("elastic.experts_policy=spread", "elastic.experts_policy='spread': must be one of random, nested"),
    ("model.moe_layer_freq=0 parallel.ep=1", "elastic.enabled=True: elastic training needs MoE layers"),
    ("moe.window=6 elastic.experts=[8]", "windows are not made of whole blocks of moe.stride"),
    ("elastic.granularity=sample", "elastic.granularity='sample': must be one of microbatch, step"),
    ("elastic.full_share=1.2", "elastic.full_share=1.2: must be a share in (0, 1]"),
    ("elastic.full_share=0", "elastic.full_share=0.0: must be a share in (0, 1]"),
    ("elastic.topk_max=9", "elastic.topk_max=9: must be between moe.topk=2 and the window (8"),
    ("elastic.topk_max=1", "elastic.topk_max=1: must be between moe.topk=2"),
])
def test_bad_elastic_config_names_field_value_and_fix(override, message):
    with pytest.raises(UserError) as err:
        tiny(*override.split())
    assert message in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("train.micro_batch_size=16", "elastic.full_share=0.75: leaves no micro-batch for sub-models "
     "in a step of 1 (train.global_batch_size=16 / train.micro_batch_size=16): lower "
     "train.micro_batch_size"),
    ("elastic.full_share=0.1", "elastic.full_share=0.1: leaves no micro-batch for the full model"),
])
def test_a_training_step_needs_micro_batches_of_both_kinds(override, message, capsys):
    """Refused by moue-pretrain (its dry run too), not by the config: evaluation and conversion
    read the same config with other batch sizes."""
    from moue.cli import pretrain
    from moue.run_check import check_training

    cfg = tiny(override)
    with pytest.raises(UserError) as err:
        check_training(cfg)
    assert message in str(err.value)
    check_training(tiny(override, "elastic.granularity=step"))
    assert pretrain(["--config", TINY, "elastic.enabled=true", "parallel.ep=1", override,
                     "--dry-run", "--world-size", "1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("depth=3", "unknown axis 'depth'; write layers=L,experts=M,topk=K"),
    ("layers=9", "layers=9 must be between 1 and model.num_layers=4"),
    ("layers=0", "layers=0 must be between 1"),
    ("experts=6", "experts=6 must be moe.num_experts=16 or a smaller multiple of the 4 blocks"),
    ("experts=4,topk=3", "topk=3 must be between 1 and the 2 experts this sub-model leaves"),
    ("topk=x", "topk='x' must be a whole number"),
])
def test_bad_submodel_names_axis_value_and_fix(text, message):
    cfg = tiny()
    with pytest.raises(UserError) as err:
        parse(text, cfg.elastic_choices(), cfg.topology().window)
    assert message in str(err.value)


def _microbatches(cfg, steps=50, count=4, size=4):
    schedule = MicrobatchSchedule(cfg.elastic, cfg.elastic_choices(), 1234, 1)
    return [schedule.draw(t, j, count, size) for t in range(steps) for j in range(count)]


def test_microbatch_draws_put_the_first_share_on_the_full_model_and_follow_the_probabilities():
    cfg = tiny()  # ERNIE's shares: 3 of 4 micro-batches full; 0.75 / 0.8 / 0.8 among the rest
    assert full_microbatches(0.75, 4) == 3 and full_microbatches(0.75, 16) == 12
    draws = _microbatches(cfg, steps=200)
    assert all(d is None for i, d in enumerate(draws) if i % 4 < 3)
    samples = [s for d in draws[3::4] if d for s in d.samples]
    assert len(samples) > 0.9 * 4 * 200  # an elastic micro-batch that reduces nothing is rare
    full_depth = sum(len(s.layers) == 4 for s in samples) / len(samples)
    full_width = sum(len(s.experts) == 16 for s in samples) / len(samples)
    assert abs(full_depth - 0.75) < 0.05 and abs(full_width - 0.8) < 0.05
    ks = [k for s in samples for k in s.topk_L]
    assert set(ks) == {1, 2, 3}  # 1 .. 2k - 1: above k too
    assert sum(ks) == 2 * len(ks)  # the mean is k exactly, micro-batch by micro-batch
    again = _microbatches(cfg, steps=200)  # a function of (seed, step, index) alone
    assert [d and d.samples for d in again] == [d and d.samples for d in draws]


def test_microbatch_topk_keeps_every_layers_total_and_fits_each_samples_width():
    cfg = tiny("elastic.topk_full_prob=0", "elastic.experts_full_prob=0", "moe.topk=3",
               "elastic.experts=[8]")  # half the pool leaves 4 of a window of 8: k <= 4
    for d in _microbatches(cfg, steps=30):
        if d is None:
            continue
        assert (d.topk_Lb.sum(dim=1) == 3 * 4).all()  # T x k assignments, as Megatron sizes them
        assert d.topk_Lb.min() >= 1 and d.topk_Lb.max() <= 4
        assert (d.keep_bE.sum(dim=1) == 8).all()
        for b, sample in enumerate(d.samples):
            assert (~d.skip_Lb[:, b]).nonzero().squeeze(1).tolist() == list(sample.layers)


def test_split_topk_is_uniform_over_the_splits_within_the_caps():
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(3000):
        parts = tuple(split_topk(gen, 2, [3, 3]))
        seen[parts] = seen.get(parts, 0) + 1
    assert set(seen) == {(1, 3), (2, 2), (3, 1)}  # (2k-1 caps out (4, 0) and (0, 4))
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in seen.values())
    assert split_topk(gen, 2, [2, 2, 2]) == [2, 2, 2] and split_topk(gen, 3, [5]) == [3]
    # Exact at any size (a redraw-until-it-fits sampler accepts 1 draw in 6000 at B = 32).
    big = [split_topk(gen, 2, [3] * 32) for _ in range(200)]
    assert all(sum(p) == 64 and 1 <= min(p) and max(p) <= 3 for p in big)
    assert sum(p.count(2) for p in big) / (200 * 32) < 0.6  # not the all-k fallback


def test_per_sample_topk_routes_each_token_as_top_k_with_its_samples_k():
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from moue.model.router import UniversalRouter

    class Router:  # the method's one dependency: the selection of a fixed k
        def _select(self, logits, k):
            return topk_routing_with_score_function(logits, k, use_pre_softmax=False,
                                                    score_function="softmax")

    s, b = 4, 3  # tokens [s, b] flattened: token t is sample t % b
    logits_TE = torch.randn(s * b, 8, generator=torch.Generator().manual_seed(1))
    k_b = [1, 3, 2]
    groups = [(k, torch.tensor([j for j in range(b) if k_b[j] == k])) for k in (1, 2, 3)]
    probs_TE, map_TE = UniversalRouter._select_per_sample(Router(), logits_TE, groups, s, b)
    for t in range(s * b):
        probs, routed = Router()._select(logits_TE[t:t + 1], k_b[t % b])
        assert torch.equal(map_TE[t], routed[0]) and torch.allclose(probs_TE[t], probs[0])
    assert map_TE.sum() == s * sum(k_b)
