"""What a machine can run (parallel.capability) and the refusals made before a model is built,
with faked capabilities: a CPU machine, GPUs of each generation with and without Transformer
Engine."""

import pytest

from moue.config import load_config
from moue.run_check import plan_run
from parallel.capability import Capabilities
from parallel.errors import UserError

pytestmark = pytest.mark.compat

CPU = Capabilities(cuda=False)
CPU_WITH_TE = Capabilities(cuda=False, te_version="2.11")
GPU_NO_TE = Capabilities(cuda=True, compute_capability=(9, 0), device_name="H100")
AMPERE = Capabilities(cuda=True, compute_capability=(8, 0), te_version="2.11", device_name="A100")
ADA = Capabilities(cuda=True, compute_capability=(8, 9), te_version="2.11", device_name="L40S")
HOPPER = Capabilities(cuda=True, compute_capability=(9, 0), te_version="2.11", device_name="H100")
BLACKWELL = Capabilities(cuda=True, compute_capability=(10, 0), te_version="2.11",
                         device_name="B200")


def _plan(caps, *overrides):
    return plan_run(load_config(None, list(overrides)), caps)


def test_fp8_recipes_follow_the_gpu_generation():
    assert CPU.fp8_recipes() == GPU_NO_TE.fp8_recipes() == AMPERE.fp8_recipes() == ()
    assert set(ADA.fp8_recipes()) == {"tensorwise", "delayed"}
    assert set(HOPPER.fp8_recipes()) == {"tensorwise", "delayed", "blockwise"}
    assert set(BLACKWELL.fp8_recipes()) == {"tensorwise", "delayed", "mxfp8"}


def test_this_machine_is_detected_as_it_is():
    import torch

    caps = Capabilities.detect()
    assert caps.cuda == torch.cuda.is_available()
    assert (caps.compute_capability is None) == (not caps.cuda)


@pytest.mark.parametrize("caps,spec,pool,grouped,precision,fusions", [
    (CPU, "local", "sequential", None, "fp32", False),
    (CPU_WITH_TE, "local", "sequential", None, "fp32", False),  # TE's layers need a GPU
    (GPU_NO_TE, "local", "sequential", None, "bf16", False),
    (HOPPER, "transformer_engine", "grouped", "transformer_engine", "bf16", True),
])
def test_auto_picks_transformer_engine_where_it_runs(caps, spec, pool, grouped, precision, fusions):
    plan = _plan(caps)
    assert (plan.transformer_impl, plan.expert_impl, plan.grouped_gemm, plan.precision,
            plan.fusions) == (spec, pool, grouped, precision, fusions)


def test_gradient_accumulation_fusion_needs_the_apex_extension():
    assert not _plan(HOPPER).grad_accum_fusion  # Megatron's output layer would refuse to build
    ngc = Capabilities(cuda=True, compute_capability=(9, 0), te_version="2.11", wgrad_fusion=True)
    assert _plan(ngc).grad_accum_fusion and _plan(ngc).fusions


def test_explicit_choices_are_kept():
    plan = _plan(HOPPER, "model.transformer_impl=local", "moe.expert_impl=grouped",
                 "train.precision=fp32")
    assert (plan.transformer_impl, plan.expert_impl, plan.grouped_gemm, plan.precision) == (
        "local", "grouped", "torch", "fp32")
    assert _plan(HOPPER, "moe.expert_impl=sequential").expert_impl == "sequential"
    assert _plan(HOPPER, "model.moe_layer_freq=0").expert_impl == "none"


@pytest.mark.parametrize("caps,overrides,words", [
    (CPU, ["model.transformer_impl=transformer_engine"],
     ["model.transformer_impl=transformer_engine", "Transformer Engine is not installed",
      "GPU image", "model.transformer_impl=local"]),
    (CPU_WITH_TE, ["model.transformer_impl=transformer_engine"], ["no CUDA GPU"]),
    (CPU, ["train.precision=fp8"], ["train.precision=fp8", "no CUDA GPU", "train.precision=bf16"]),
    (GPU_NO_TE, ["train.precision=fp8"], ["Transformer Engine is not installed", "GPU image"]),
    (HOPPER, ["train.precision=fp8", "model.transformer_impl=local"],
     ["model.transformer_impl=local was asked for"]),
    (AMPERE, ["train.precision=fp8"], ["train.fp8_recipe=tensorwise", "A100", "(8, 0)",
                                       "compute capability 8.9+", "train.precision=bf16"]),
    (HOPPER, ["train.precision=fp8", "train.fp8_recipe=mxfp8"], ["mxfp8", "H100",
                                                                  "tensorwise, delayed, blockwise"]),
    (BLACKWELL, ["train.precision=fp8", "train.fp8_recipe=blockwise"], ["blockwise", "B200"]),
    (HOPPER, ["train.precision=fp8", "train.fp8_recipe=delayed"],
     ["train.fp8_recipe=delayed", "one amax history per module", "train.fp8_recipe=tensorwise"]),
])
def test_requests_the_machine_cannot_serve_are_refused(caps, overrides, words):
    with pytest.raises(UserError) as err:
        _plan(caps, *overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_fp8_recipes_the_gpu_has_are_planned():
    for caps, recipe in ((ADA, "tensorwise"), (HOPPER, "blockwise"), (BLACKWELL, "mxfp8")):
        plan = _plan(caps, "train.precision=fp8", f"train.fp8_recipe={recipe}")
        assert (plan.precision, plan.fp8_recipe) == ("fp8", recipe)
    # delayed scaling is refused for the pool only: a dense model keeps its per-module history
    assert _plan(HOPPER, "train.precision=fp8", "train.fp8_recipe=delayed",
                 "model.moe_layer_freq=0").fp8_recipe == "delayed"


def test_torch_grouped_gemm_needs_aligned_rows():
    with pytest.raises(UserError, match=r"moe.expert_ffn_hidden_size=66: .* multiple of 4"):
        _plan(CPU, "moe.expert_impl=grouped", "moe.expert_ffn_hidden_size=66")
    with pytest.raises(UserError, match=r"multiple of 8 in bf16; .* moe.expert_impl=sequential"):
        _plan(CPU, "moe.expert_impl=grouped", "moe.expert_ffn_hidden_size=68",
              "train.precision=bf16")
    assert _plan(CPU, "moe.expert_impl=grouped", "moe.expert_ffn_hidden_size=68").expert_impl == \
        "grouped"


@pytest.mark.parametrize("module,words", [
    ("moe", ["trajectory state", "load counts", "train.recompute=full"]),
    ("moe_act", ["one module serving every MoE layer", "overwrite"]),
    ("mla_up_proj", ["multi-latent attention"]),
])
def test_recompute_modules_unsafe_with_the_shared_pool_are_refused(module, words):
    with pytest.raises(UserError) as err:
        load_config(None, ["train.recompute=selective", f"train.recompute_modules=[{module}]"])
    assert f"train.recompute_modules='{module}'" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_recompute_settings_are_checked():
    with pytest.raises(UserError, match="train.recompute_modules.*train.recompute=selective"):
        load_config(None, ["train.recompute_modules=[core_attn]"])
    with pytest.raises(UserError, match="train.recompute_modules='attention'"):
        load_config(None, ["train.recompute=selective", "train.recompute_modules=[attention]"])
    with pytest.raises(UserError, match="train.recompute='partial'"):
        load_config(None, ["train.recompute=partial"])
    load_config(None, ["train.recompute=selective", "train.recompute_modules=[core_attn, mlp]"])


def test_layernorm_recompute_needs_transformer_engine():
    overrides = ("train.recompute=selective", "train.recompute_modules=[layernorm]")
    with pytest.raises(UserError, match="'layernorm' needs Transformer Engine"):
        _plan(CPU, *overrides)
    assert _plan(HOPPER, *overrides).transformer_impl == "transformer_engine"


def test_new_fields_name_their_choices():
    for override, field in (("model.activation=relu", "model.activation"),
                            ("model.transformer_impl=te", "model.transformer_impl"),
                            ("moe.expert_impl=fused", "moe.expert_impl"),
                            ("train.precision=fp16", "train.precision"),
                            ("train.fp8_recipe=hybrid", "train.fp8_recipe")):
        with pytest.raises(UserError, match=field):
            load_config(None, [override])


def test_grad_accum_fusion_can_be_asked_for_and_turned_off():
    hopper_apex = Capabilities(cuda=True, compute_capability=(9, 0), te_version="2.11",
                               device_name="H100", wgrad_fusion=True)
    assert _plan(hopper_apex).grad_accum_fusion
    assert not _plan(hopper_apex, "train.grad_accum_fusion=false").grad_accum_fusion
    # On a CPU, true runs the stand-ins of apex's and Transformer Engine's kernels.
    assert _plan(CPU, "train.grad_accum_fusion=true").grad_accum_fusion
    assert not _plan(CPU).grad_accum_fusion
    with pytest.raises(UserError, match="train.grad_accum_fusion=true: apex's "
                                        "fused_weight_gradient_mlp_cuda .* not installed on H100"):
        _plan(HOPPER, "train.grad_accum_fusion=true")


FP8 = ("train.precision=fp8", "model.transformer_impl=transformer_engine")


@pytest.mark.parametrize("overrides,words", [
    (["moe.expert_ffn_hidden_size=72"],
     "an expert's linear_fc2 input a multiple of 16, and it is 72 on each rank "
     r"\(moe.expert_ffn_hidden_size / ETP\); change moe.expert_ffn_hidden_size"),
    (["model.seq_length=100", "train.micro_batch_size=1"],
     "the tokens of a micro-batch a multiple of 8, and it is 100"),
    (["model.hidden_size=72", "model.num_attention_heads=4"], "the hidden size"),
    (["model.moe_layer_freq=2", "model.ffn_hidden_size=200"], "the dense MLP's linear_fc2 input"),
    (["moe.shared_experts=1", "moe.expert_ffn_hidden_size=48", "parallel.tp=2",
      "parallel.etp=1"],
     "the shared experts' linear_fc2 input a multiple of 16, and it is 24"),
])
def test_fp8_gemm_sizes_are_checked_before_building(overrides, words):
    with pytest.raises(UserError, match=words):
        _plan(HOPPER, *FP8, *overrides)


def test_fp8_gemm_sizes_are_per_rank():
    # 64 / ETP=2 = 32 columns per rank: aligned; the shipped GPU configs are too.
    assert _plan(HOPPER, *FP8, "moe.expert_ffn_hidden_size=64", "parallel.ep=2",
                 "parallel.tp=2", "parallel.etp=2").precision == "fp8"
    for name in ("moue_1b_gpu", "moe_1b_baseline_gpu"):
        cfg = load_config(f"examples/configs/{name}.yaml", list(FP8))
        assert plan_run(cfg, HOPPER).precision == "fp8"


def test_mxfp8_needs_multiples_of_32():
    blackwell = (*FP8, "train.fp8_recipe=mxfp8")
    assert _plan(BLACKWELL, *blackwell, "moe.expert_ffn_hidden_size=64").fp8_recipe == "mxfp8"
    with pytest.raises(UserError, match="MXFP8 GEMMs need an expert's linear_fc2 input a "
                                        "multiple of 32, and it is 48"):
        _plan(BLACKWELL, *blackwell, "moe.expert_ffn_hidden_size=48")


def test_local_attention_on_a_gpu_warns_when_its_scores_fill_memory():
    from moue.run_check import local_attention_warning

    h100 = Capabilities(cuda=True, compute_capability=(9, 0), device_name="H100",
                        memory_bytes=80 * 2**30)
    cfg = load_config("examples/configs/moue_1b_gpu.yaml", ["model.transformer_impl=local"])
    warning = local_attention_warning(cfg, plan_run(cfg, h100), h100)
    # 24 layers x 2 sequences x 16 heads x 4096^2 x 2 bytes = 24 GiB (30% of 80 GiB).
    assert "model.transformer_impl resolved to local on H100" in warning
    assert "about 24.0 GiB for this stage's 24 layer(s) at model.seq_length=4096" in warning
    assert "train.recompute=full" in warning and "docker/" in warning
    recomputed = load_config("examples/configs/moue_1b_gpu.yaml",
                             ["model.transformer_impl=local", "train.recompute=full"])
    assert local_attention_warning(recomputed, plan_run(recomputed, h100), h100) is None
    short = load_config("examples/configs/moue_1b_gpu.yaml",
                        ["model.transformer_impl=local", "model.seq_length=1024"])
    assert local_attention_warning(short, plan_run(short, h100), h100) is None
    assert local_attention_warning(cfg, plan_run(cfg, CPU), CPU) is None
