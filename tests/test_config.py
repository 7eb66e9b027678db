"""Config loading: YAML sections, dotted overrides, and every rejection naming field and fix."""

from dataclasses import fields
from pathlib import Path

import pytest

from moue.config import (
    ARCHITECTURE_SECTIONS,
    SECTIONS,
    DataConfig,
    RunConfig,
    load_config,
    may_change_on_resume,
    with_reference,
)
from moue.sections import ARCHITECTURE, MAY_CHANGE

pytestmark = pytest.mark.compat

TINY = "examples/configs/tiny_cpu.yaml"
ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["moe.window=4", "parallel.ep=1", "train.steps=70", "data.mock=true"])
    assert (cfg.moe.window, cfg.parallel.ep, cfg.train.steps) == (4, 1, 70)
    assert cfg.model.num_layers % 2 == 0 and cfg.moe.num_experts % 2 == 0  # pp=2, ep=2, tp=2 fit
    assert isinstance(cfg, RunConfig)


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["moe.z_loss_coeff=1e-3", "parallel.etp=null", "data.mock=true"])
    assert cfg.moe.z_loss_coeff == 1e-3 and cfg.parallel.etp is None


@pytest.mark.parametrize("override,message", [
    ("moe.windw=8", "unknown key moe.windw; did you mean moe.window?"),
    ("mo.window=8", "unknown config section 'mo'"),
    ("moe.window", "use section.key=value"),
    ("moe.window=40", "moe.window=40: the window cannot be larger than the pool"),
    ("moe.stride=0", "moe.stride=0: must be a positive integer"),
    ("moe.topk=9", "moe.topk=9: larger than the window of 8 experts"),
    ("moe.topology=ring", "moe.topology='ring': must be one of explicit, full, rotational, standard"),
    ("moe.balance=switch", "moe.balance='switch': must be one of aux_free, none, per_layer, uelb"),
    ("moe.num_experts=12", None),  # rotational 8-wide windows fit a pool of 12: valid
    ("model.hidden_size=65", "model.hidden_size=65: must be a multiple of"),
    ("train.global_batch_size=10", "train.global_batch_size=10: must be a multiple of"),
    ("model.rope_base=1", "model.rope_base=1.0: must be > 1"),
    ("model.norm_epsilon=0", "model.norm_epsilon=0.0: must lie in (0, 1)"),
    ("model.qk_norm=maybe", "model.qk_norm='maybe': must be true or false"),
    ("moe.shared_expert_gate=true", "moe.shared_expert_gate=True: gates the shared experts: set "
                                    "moe.shared_experts > 0"),
])
def test_bad_values_name_the_field_and_the_fix(override, message):
    if message is None:
        load_config(TINY, [override])
        return
    with pytest.raises(ValueError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_unknown_section_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  num_layers: 2\n")
    with pytest.raises(ValueError, match="unknown section 'modle'; did you mean model"):
        load_config(path)


def test_data_needs_a_path_or_mock():
    with pytest.raises(ValueError, match="data.path=None: set data.path"):
        load_config(None, ["data.mock=false"])


def test_every_section_is_valid_as_constructed():
    """Each section's defaults are a valid section (data: synthetic tokens until a dataset is
    named, then that dataset)."""
    for cls in SECTIONS.values():
        cls()
    assert DataConfig().mock is True and DataConfig(path="data/web").mock is False
    assert load_config(None, ["data.path=data/web"]).data.mock is False


@pytest.mark.parametrize("override,message", [
    ("moe.eligibility=[[0, 1], [a, 2]]", "must be a list of lists of integers or null"),
    ("elastic.layers=[2, 2.5]", "must be a list of integers or null"),
    ("train.recompute_modules=[1]", "must be a list of strings or null"),
    ("data.blend=[0.5, [a]]", "must be a list of numbers or strings or null"),
])
def test_list_fields_check_their_elements(override, message):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_every_field_says_what_it_means_and_whether_a_resume_may_change_it():
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.metadata.get("doc"), f"{name}.{f.name} has no doc (moue.sections.setting)"
            declared = f.metadata.get("resume")
            if name in ARCHITECTURE_SECTIONS:  # a new model/moe field must choose
                assert declared in (ARCHITECTURE, MAY_CHANGE), f"{name}.{f.name}: {declared}"
            else:
                assert declared is None, f"{name}.{f.name}: only model and moe fields declare it"
    free = may_change_on_resume()
    assert "moe.balance_coeff" in free and "model.seq_length" in free
    assert "moe.num_experts" not in free and "moe.num_experts" in {
        f"moe.{k}" for k in RunConfig().architecture()["moe"]}


def test_the_reference_in_the_docs_is_generated_from_the_fields():
    docs = ROOT / "docs" / "configuration.md"
    assert with_reference(docs.read_text()) == docs.read_text(), (
        "docs/configuration.md is stale: run python -m moue.config")


def test_numbers_in_exponent_notation_are_numbers():
    cfg = load_config(None, ["train.lr=3e-4", "moe.balance_coeff=1e-2", "data.mock=true"])
    assert cfg.train.lr == 3e-4 and cfg.moe.balance_coeff == 1e-2
    with pytest.raises(ValueError, match="train.lr='fast': must be a number"):
        load_config(None, ["train.lr=fast"])


def test_moe_layer_freq_zero_is_the_dense_baseline():
    cfg = load_config(TINY, ["model.moe_layer_freq=0", "parallel.ep=1", "moe.window=40"])
    # No MoE layers: the moe section builds nothing, so its pool checks do not apply.
    assert cfg.model.dense and cfg.model.moe_layers == [] and cfg.topology() is None
    with pytest.raises(ValueError, match=r"parallel.ep=2: the dense model .* use parallel.ep=1"):
        load_config(TINY, ["model.moe_layer_freq=0"])
    with pytest.raises(ValueError, match=r"model.moe_layer_freq=-1: must be an integer >= 0"):
        load_config(TINY, ["model.moe_layer_freq=-1", "parallel.ep=1"])


def test_data_seed_defaults_to_the_training_seed():
    assert load_config(TINY, ["train.seed=7"]).data_seed == 7
    assert load_config(TINY, ["train.seed=7", "data.seed=3"]).data_seed == 3
