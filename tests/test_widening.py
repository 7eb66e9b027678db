"""Progressive widening (``moue-convert widen``): a standard MoE becomes a rotational MoUE whose
layers open the rest of their window over a ramp of steps. At the switch the logits are the
standard model's; the ramp acts from the second step; resuming mid-ramp is exact; every layout
trains as one process; bad requests are named."""

import json

import numpy as np
import pytest

from moue.commands.evaluate import evaluate_tokens
from moue.commands.pretrain import run
from moue.config import load_config
from moue.convert.huggingface import export_hf
from moue.convert.widen import widen
from moue.model.widening import widen_scale
from moue.run_check import check_run
from parallel import launch as process_groups
from parallel.errors import UserError
from tests.cases.widening import train_widened
from tests.distributed import launch, max_rel

STANDARD = ["model.activation=swiglu", "moe.topology=standard", "moe.num_experts=16",
            "moe.router_state_dim=0", "parallel.ep=1", "model.seq_length=32", "train.steps=2",
            "train.warmup_steps=1", "train.eval_interval=0",
            "moe.ep_balance_groups=2"]  # the same EP-balance loss on every layout
RTOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """std: a standard MoE (4 layers x 4 experts) trained 2 steps; wide / wide_state: it widened
    to windows of 8 over 4 steps, without and with the trajectory state; tokens.npy."""
    base = tmp_path_factory.mktemp("widen")
    run(load_config("examples/configs/tiny_cpu.yaml", [
        *STANDARD, f"checkpoint.dir={base / 'std'}", f"logging.dir={base / 'log'}"]))
    widen(str(base / "std"), str(base / "wide"), 8, 4, [])
    widen(str(base / "std"), str(base / "wide_state"), 8, 4, ["moe.router_state_dim=8"])
    np.save(base / "tokens.npy", np.random.default_rng(0).integers(0, 256, size=(2, 17)))
    return base


def _logits(base, name):
    out = base / f"{name}.npy"
    evaluate_tokens(str(base / name), str(base / "tokens.npy"), [], str(out))
    return np.load(out)


def test_the_switch_keeps_the_standard_models_logits(base):
    standard = _logits(base, "std")
    for name in ("wide", "wide_state"):
        assert np.abs(_logits(base, name) - standard).max() <= 1e-6, name
    config = (base / "wide" / "config.yaml").read_text()
    assert "topology: rotational" in config and "widen_block: 4" in config
    # the widened model trains on from where its base stopped: 2 steps of 16 samples
    assert "start_sample: 32" in config


def _train(base, tmp_path, tag, *extra, stop_after=None):
    process_groups.init_distributed(check_run(load_config(
        str(base / "wide" / "config.yaml"), ["parallel.ep=1"]), 1), device="cpu")
    try:
        return train_widened(base / "wide", tmp_path / tag, "single", *extra,
                             stop_after=stop_after)
    finally:
        process_groups.shutdown()


def test_the_ramp_opens_the_window_and_resumes_exactly(base, tmp_path):
    ramp4 = _train(base, tmp_path, "ramp4")
    ramp1 = _train(base, tmp_path, "ramp1", "moe.widen_steps=1")
    assert ramp4[1] == ramp1[1]  # step 1: closed in both (t = 0)
    assert abs(ramp4[2][0] - ramp1[2][0]) > 1e-4  # step 2: a quarter open vs fully open
    # resume mid-ramp: stopped by SIGTERM after step 2 (a checkpoint is saved), then the same
    # command again
    first = _train(base, tmp_path, "resumed", stop_after=2)
    rest = _train(base, tmp_path, "resumed")
    assert sorted(first) == [1, 2] and rest == ramp4


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_widened_training_is_the_same_on_every_layout(base, tmp_path, layout):
    env = (("MOUE_WIDEN_DIR", str(base)),)
    runs = launch("tests.cases.widening", 2, env_vars=env)[f"widened[{layout}]"]
    reference = _reference(base)
    for r in runs:
        steps = sorted(reference)
        assert max_rel([r[str(s)][0] for s in steps], [reference[s][0] for s in steps]) <= RTOL
        assert max_rel([r[str(s)][1] for s in steps], [reference[s][1] for s in steps]) <= RTOL


_REFERENCE: dict = {}


def _reference(base) -> dict:
    """One process's 4 steps of the widened checkpoint with the trajectory state."""
    if not _REFERENCE:
        process_groups.init_distributed(check_run(load_config(
            str(base / "wide_state" / "config.yaml"), ["parallel.ep=1"]), 1), device="cpu")
        try:
            _REFERENCE.update(train_widened(base / "wide_state", base / "run_single", "single"))
        finally:
            process_groups.shutdown()
    return _REFERENCE


def test_widen_scale():
    assert [widen_scale(t, 4) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert widen_scale(0, 0) == 1.0


@pytest.mark.parametrize("window, overrides, message", [
    (4, [], r"--window 4: must lie in \(4, 16\]"),
    (8, ["moe.window=12"], "only moe.router_state_dim may be set"),
])
def test_bad_widening_requests(base, tmp_path, window, overrides, message):
    with pytest.raises(UserError, match=message):
        widen(str(base / "std"), str(tmp_path / "out"), window, 4, overrides)
    assert not (tmp_path / "out").exists()


def test_export_waits_for_the_end_of_the_ramp(base, tmp_path):
    with pytest.raises(UserError, match="step 0 of a widening ramp of 4 steps"):
        export_hf(str(base / "wide"), str(tmp_path / "hf"), None)
    assert not (tmp_path / "hf").exists()


def test_only_standard_checkpoints_widen(base, tmp_path):
    with pytest.raises(UserError, match="widening starts from a standard-topology model"):
        widen(str(base / "wide"), str(tmp_path / "out"), 12, 4, [])


def test_widening_config_rules():
    with pytest.raises(UserError, match="moe.widen_block"):
        load_config(None, ["moe.topology=rotational", "moe.stride=2", "moe.window=8",
                           "moe.widen_block=4", "moe.widen_steps=2"])
    with pytest.raises(UserError, match="moe.widen_steps"):
        load_config(None, ["moe.topology=rotational", "moe.stride=4", "moe.window=8",
                           "moe.widen_block=4"])
    cfg = load_config(None, ["moe.topology=rotational", "moe.stride=4", "moe.window=8",
                             "moe.widen_block=4", "moe.widen_steps=2"])
    assert json.dumps(cfg.to_dict()["moe"]["widen_block"]) == "4"
