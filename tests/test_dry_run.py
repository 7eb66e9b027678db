"""moe-pretrain --dry-run: the figures a researcher checks before launching."""

import json

import pytest

from moue.cli import pretrain

pytestmark = pytest.mark.compat

ISSUE_EXAMPLE = ["model.num_layers=4", "model.moe_layer_freq=1", "moe.num_experts=16",
                 "moe.topology=rotational", "moe.window=8", "moe.stride=4", "moe.topk=2"]


def _dry_run(capsys, *argv):
    assert pretrain([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rotational_reports_virtual_width_reuse_and_exposure(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE)
    assert out["virtual_width"] == 32 and out["reuse_factor"] == 2.0
    assert out["exposure"] == [2] * 16
    assert out["params_active"] < out["params_total"]
    assert out["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "ep": 1, "etp": 1, "dp": 1,
                             "edp": 1, "sequence_parallel": False}


def test_standard_reports_width_of_the_pool(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE, "moe.topology=standard")
    assert out["virtual_width"] == 16 and out["reuse_factor"] == 1.0 and out["exposure"] == [1] * 16


def test_active_parameters_count_topk_experts_per_layer(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE)
    parts = out["params_by_part"]
    expert = parts["pool"] // 16
    assert out["params_active"] == out["params_total"] - parts["pool"] + 4 * 2 * expert


def test_world_size_validates_the_planned_layout(capsys):
    out = _dry_run(capsys, "--config", "examples/configs/tiny_cpu.yaml", "parallel.pp=2",
                   "--world-size", "8")
    assert out["layout"]["dp"] == 4 and out["layout"]["edp"] == 2
    assert pretrain(["--config", "examples/configs/tiny_cpu.yaml", "parallel.ep=3", "--dry-run",
                     "--world-size", "6"]) == 2
    assert "parallel.ep=3 does not divide moe.num_experts=16" in capsys.readouterr().err


def test_without_a_world_size_the_smallest_world_of_the_layout_is_checked(capsys):
    """tiny_cpu.yaml has ep=2: it dry-runs on 2 processes (the --help example)."""
    assert _dry_run(capsys, "--config", "examples/configs/tiny_cpu.yaml")["layout"]["world_size"] == 2
    out = _dry_run(capsys, "--config", "examples/configs/tiny_cpu.yaml", "parallel.tp=2",
                   "parallel.pp=2", "parallel.ep=4", "parallel.etp=1")
    assert out["layout"]["world_size"] == 8  # lcm(tp*pp = 4, etp*ep*pp = 8)


def test_the_batch_split_is_checked_by_the_dry_run_as_at_launch(capsys):
    """global batch 16 of micro-batches of 4 cannot split over 3 data-parallel ranks."""
    assert pretrain(["--config", "examples/configs/tiny_cpu.yaml", "parallel.ep=1", "--dry-run",
                     "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size=16 must be a multiple of" in err and "4 x 3" in err


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as code:
        pretrain(["--help"])
    assert code.value.code == 0 and "--dry-run" in capsys.readouterr().out


def test_flops_per_token_counts_only_activated_experts(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE)
    bigger_pool = _dry_run(capsys, *ISSUE_EXAMPLE, "moe.num_experts=32")
    # Twice the pool, same windows and top-k: only U (E x d_r, applied in full) adds compute.
    assert bigger_pool["train_flops_per_token"] - out["train_flops_per_token"] == 6 * 16 * 64
    parts = out["params_by_part"]
    applied = out["params_active"] - parts["embedding"]
    attention = 6 * 4 * 128 * 64  # 6 * layers * seq * hidden (defaults: seq 128, hidden 64)
    assert out["train_flops_per_token"] == 6 * applied + attention
    # Tied embeddings: one weight fewer (vocab x hidden), the same compute per token.
    tied = _dry_run(capsys, *ISSUE_EXAMPLE, "model.tie_embeddings=true")
    assert out["params_total"] - tied["params_total"] == 256 * 64
    assert tied["train_flops_per_token"] == out["train_flops_per_token"]


def test_elastic_runs_list_their_family_with_sizes(capsys):
    assert pretrain(["--config", "examples/configs/tiny_cpu.yaml", "--dry-run",
                     "elastic.enabled=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    family = {row["submodel"]: row for row in out["elastic_family"]}
    assert len(family) == 8 and family["layers=4,experts=16,topk=2"]["params_total"] == out[
        "params_total"]
    small = family["layers=3,experts=8,topk=1"]
    assert small["params_active"] < out["params_active"]
    assert small["fwd_flops_per_token"] < out["train_flops_per_token"] / 3


def test_reports_the_implementation_here_and_on_a_gpu_with_transformer_engine(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE, "model.activation=swiglu")["implementation"]
    assert out["this_machine"] == {"transformer_impl": "local", "expert_impl": "sequential",
                                   "grouped_gemm": None, "precision": "fp32", "fp8_recipe": None,
                                   "fusions": False, "grad_accum_fusion": False}
    assert out["gpu_with_transformer_engine"] == {
        "transformer_impl": "transformer_engine", "expert_impl": "grouped",
        "grouped_gemm": "transformer_engine", "precision": "bf16", "fp8_recipe": None,
        "fusions": True, "grad_accum_fusion": True}


def test_fp8_is_refused_here_and_planned_on_a_gpu(capsys):
    out = _dry_run(capsys, *ISSUE_EXAMPLE, "train.precision=fp8",
                   "train.fp8_recipe=blockwise")["implementation"]
    assert "train.precision=fp8" in out["this_machine"]["refused"]
    gpu = out["gpu_with_transformer_engine"]
    assert (gpu["precision"], gpu["fp8_recipe"]) == ("fp8", "blockwise")
