"""Every shipped config passes the dry run on CPU; every script parses."""

import math
import subprocess
from pathlib import Path

import pytest

from moue.config import load_config
from moue.dry_run import report

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "examples" / "scripts").glob("*"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_dry_runs_at_its_smallest_world(path):
    cfg = load_config(path)
    p = cfg.parallel
    etp = p.etp or (p.tp if p.ep == 1 else 1)
    world = math.lcm(p.tp * p.pp, etp * p.ep * p.pp)
    out = report(cfg)  # no world size: the smallest the layout needs
    assert out["params_total"] > 0 and out["layout"]["world_size"] == world


def test_the_1b_example_and_its_baseline_activate_the_same_parameters():
    moue = report(load_config(ROOT / "examples/configs/moue_1b_gpu.yaml"), 8)
    moe = report(load_config(ROOT / "examples/configs/moe_1b_baseline_gpu.yaml"), 8)
    assert abs(moue["params_active"] - moe["params_active"]) / moe["params_active"] < 1e-4
    assert 0.9e9 < moue["params_active"] < 1.2e9 and moue["reuse_factor"] == 8.0


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path):
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
