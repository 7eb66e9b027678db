"""``moue-convert`` against ``transformers``: small random Mixtral, Qwen2-MoE and Qwen3-MoE models
(built here, nothing downloaded) imported into moue give transformers' logits in fp32 in one
process and under TP=2 (+SP), PP=2, EP=2; exported back they are the same tensors; a rotational
MoUE model exported as private expert copies gives its own logits in transformers; bad inputs
are named and leave nothing under the output's name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
from megatron.core import dist_checkpointing  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moue import checkpoint  # noqa: E402
from moue.commands.evaluate import evaluate_tokens  # noqa: E402
from moue.commands.pretrain import run  # noqa: E402
from moue.config import load_config  # noqa: E402
from moue.convert.families import export_family  # noqa: E402
from moue.convert.hf_format import Tensors, write_tensors  # noqa: E402
from moue.convert.huggingface import export_hf, import_hf  # noqa: E402
from moue.run_check import check_run  # noqa: E402
from moue.training.trainer import train  # noqa: E402
from parallel import launch as process_groups  # noqa: E402
from parallel.errors import UserError  # noqa: E402
from tests.commands import refused  # noqa: E402
from tests.distributed import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
TOL = 1e-5  # fp32; measured about 1e-7 (docs/conversion.md)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
COMMON = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1)


def _hf_model(family: str):
    """A random model of each family, each with other options on."""
    torch.manual_seed(7)
    if family == "mixtral":  # GQA, RoPE base 1e6, softmax then top-k renormalised
        config = transformers.MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=48,
                                            num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(config)
    if family == "qwen2_moe":  # gated shared expert, qkv bias, tied embeddings, dense layers
        config = transformers.Qwen2MoeConfig(
            **COMMON, num_hidden_layers=4, mlp_only_layers=[1, 3], intermediate_size=40,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, norm_topk_prob=False, tie_word_embeddings=True)
        return transformers.Qwen2MoeForCausalLM(config)
    config = transformers.Qwen3MoeConfig(  # per-head q/k norms, head_dim != hidden/heads
        **COMMON, num_hidden_layers=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=16, norm_topk_prob=True)
    return transformers.Qwen3MoeForCausalLM(config)


def _tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))


def _hf_logits(directory: Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(tokens)).logits[:, :-1].numpy()


def _cli(*args, expect=0):
    proc = subprocess.run([sys.executable, "-m", "moue.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Per family: hf/ (saved by transformers, with a tokenizer), moue/ (imported by the CLI),
    reference_logits.npy; tokens.npy: [2, 13] (12 positions, which tp=2 divides)."""
    base = tmp_path_factory.mktemp("convert")
    tokens = np.random.default_rng(0).integers(0, 90, size=(2, 13))
    np.save(base / "tokens.npy", tokens)
    for family in FAMILIES:
        hf = base / family / "hf"
        _hf_model(family).save_pretrained(hf)
        _tokenizer(hf, 90)
        np.save(base / family / "reference_logits.npy", _hf_logits(hf, tokens))
        import_hf(str(hf), str(base / family / "moue"), [])  # the command's function (CLI below)
    return base


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_in_one_process(base, family):
    out, tokens = base / family / "one.npy", base / "tokens.npy"
    if family == "mixtral":  # the command as a user runs it, once
        proc = _cli("eval", "--load", str(base / family / "moue"), "--tokens", str(tokens),
                    "--logits", str(out))
        printed = float(proc.stdout.split("positions: ")[1].split()[0])
        assert "MockGPTDataset" not in proc.stderr  # no datasets built for a token array
    else:
        printed = evaluate_tokens(str(base / family / "moue"), str(tokens), [], str(out))["loss"]
    reference = np.load(base / family / "reference_logits.npy")
    diff = np.abs(np.load(out) - reference).max()
    print(f"{family} one process: max |logit difference| {diff:.2e}, "
          f"largest logit {np.abs(reference).max():.2f}")
    assert diff <= TOL, f"{family}: max |logit difference| {diff:.2e}"
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(reference).flatten(0, 1),
                                             torch.from_numpy(np.load(tokens))[:, 1:].flatten())
    assert abs(printed - loss.item()) <= 1e-5 * loss.item(), (printed, loss.item())
    config = (base / family / "moue" / "config.yaml").read_text()
    assert "topology: standard" in config and "tokenizer.json" in config


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_on_every_layout(base, family, layout):
    env = (("MOUE_CONVERT_DIR", str(base)),)
    diffs = launch("tests.cases.conversion", 2, env_vars=env)[f"logits[{family}-{layout}]"]
    measured = [d for d in diffs if d is not None]
    print(f"{family} {layout}: max |logit difference| {max(measured):.2e}")
    assert measured and max(measured) <= TOL, (family, layout, diffs)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_returns_the_imported_tensors(base, family):
    out = base / family / "exported"
    if family == "mixtral":  # the command as a user runs it, once
        proc = _cli("convert", "export", "--load", str(base / family / "moue"), "--hf-output",
                    str(out))
        assert f"({family})" in proc.stdout
    else:
        assert export_hf(str(base / family / "moue"), str(out), None)[1] == family
    original, exported = (load_file(d / "model.safetensors") for d in (base / family / "hf", out))
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert (out / "tokenizer.json").exists()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == family
    logits = _hf_logits(out, np.load(base / "tokens.npy"))
    assert np.abs(logits - np.load(base / family / "reference_logits.npy")).max() <= 1e-6


def test_moue_model_exports_as_private_expert_copies(tmp_path):
    """A rotational pool (16 experts, windows of 8, stride 4, so layer 3 wraps around) trained for
    2 steps: transformers gives moue's logits on the exported Mixtral-format model."""
    ckpt = tmp_path / "ckpt"
    run(load_config("examples/configs/tiny_cpu.yaml", [
        "model.activation=swiglu", "moe.router_state_dim=0", "parallel.ep=1",
        "model.seq_length=32", "train.steps=2", "train.warmup_steps=1", "train.eval_interval=0",
        f"checkpoint.dir={ckpt}", f"logging.dir={tmp_path / 'log'}"]))
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, 17))
    np.save(tmp_path / "tokens.npy", tokens)
    evaluate_tokens(str(ckpt), str(tmp_path / "tokens.npy"), [], str(tmp_path / "moue.npy"))
    export_hf(str(ckpt), str(tmp_path / "hf"), None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"]) == ("mixtral", 8)
    diff = np.abs(_hf_logits(tmp_path / "hf", tokens) - np.load(tmp_path / "moue.npy")).max()
    print(f"rotational MoUE exported: max |logit difference| {diff:.2e}")
    assert diff <= TOL, diff


def _torchrun(*args, ok=True):
    """A moue command under torchrun on 2 CPU processes, as a user launches it."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "moue.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("moue-convert: wrote") == 1, proc.stdout  # once a job
    return proc


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory, through its index when it has one; checks
    that the index names each tensor's file and the total size."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    meta = json.loads(index.read_text())
    tensors = {}
    for file in sorted(set(meta["weight_map"].values())):
        part = load_file(directory / file)
        assert all(meta["weight_map"][name] == file for name in part), file
        tensors.update(part)
    assert sorted(tensors) == sorted(meta["weight_map"])
    assert meta["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                 for t in tensors.values())
    return tensors


def test_import_and_export_under_torchrun_spread_the_experts(base, tmp_path):
    """Qwen2-MoE (tied embeddings, dense layers, a gated shared expert) on 2 processes: the
    import writes each process's shards, and its weights are the source's; the export of the
    one-process import writes each process's safetensors files and an index, and transformers
    gives the reference logits from it."""
    family = "qwen2_moe"
    imported, exported = tmp_path / "imported", tmp_path / "exported"
    _torchrun("convert", "import", "--hf", str(base / family / "hf"), "--output", str(imported))
    step = imported / "step_0000000"
    assert {p.name for p in step.glob("__*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    export_hf(str(imported), str(tmp_path / "back"), None)  # one process reads it whole
    original = load_file(base / family / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(original[k], back[k]) for k in original)

    _torchrun("convert", "export", "--load", str(base / family / "moue"), "--hf-output",
              str(exported))
    files = sorted(p.name for p in exported.glob("model-*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    spread = _hf_tensors(exported)
    assert sorted(spread) == sorted(original)
    assert all(torch.equal(original[k], spread[k]) for k in original)
    assert not list(tmp_path.glob(".*partial"))
    logits = _hf_logits(exported, np.load(base / "tokens.npy"))
    assert np.abs(logits - np.load(base / family / "reference_logits.npy")).max() <= 1e-6


def test_fused_expert_tensors_import_under_torchrun(base, tmp_path):
    """Experts stored fused (``experts.gate_up_proj`` [N, 2I, h], ``experts.down_proj``
    [N, h, I]): each of 2 processes reads its own experts' rows, and the import holds the same
    weights as the one-process import of the same model stored expert by expert."""
    source = tmp_path / "hf"
    shutil.copytree(base / "mixtral" / "hf", source)
    tensors = load_file(source / "model.safetensors")
    for i in range(2):
        prefix = f"model.layers.{i}.block_sparse_moe.experts."
        experts = [[tensors.pop(f"{prefix}{j}.{n}.weight") for n in ("w1", "w3", "w2")]
                   for j in range(4)]
        tensors[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
        tensors[prefix + "down_proj"] = torch.stack([d for *_, d in experts])
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    _torchrun("convert", "import", "--hf", str(source), "--output", str(tmp_path / "moue"))
    export_hf(str(tmp_path / "moue"), str(tmp_path / "back"), None)
    export_hf(str(base / "mixtral" / "moue"), str(tmp_path / "reference"), None)
    back, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("back", "reference"))
    assert sorted(back) == sorted(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_bad_input_one_process_meets_stops_every_process_with_its_message(base, tmp_path):
    """An expert's tensor missing: only the process holding pool expert 1 (rank 1) reads it; it
    names the tensor, the other process says which one stopped, each exits with status 2
    (no process waits for the failed one) and nothing is written."""
    source = tmp_path / "hf"
    shutil.copytree(base / "mixtral" / "hf", source)
    _edit_tensors(source, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.1.w1.weight"))
    proc = _torchrun("convert", "import", "--hf", str(source), "--output", str(tmp_path / "out"),
                     ok=False)
    assert proc.returncode != 0
    assert ("moue-convert: error (rank 1): --hf " in proc.stderr and
            "has no tensor 'model.layers.0.block_sparse_moe.experts.1.w1.weight'" in proc.stderr)
    assert "moue-convert: error: stopped: process 1 met bad input" in proc.stderr
    assert "exitcode  : 2" in proc.stderr and "exitcode  : 1" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_spread_conversion_needs_a_process_count_dividing_the_experts(monkeypatch, base,
                                                                     tmp_path, capsys):
    """Under a launch of 3 processes: the import names the 8 experts and the fix; the commands
    that hold the whole model refuse the launch, before any work."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="3 processes: the model has 8 experts in its pool, "
                                        "which moue-convert spreads over its processes"):
        import_hf(str(base / "mixtral" / "hf"), str(tmp_path / "o"), [])
    assert not (tmp_path / "o").exists()
    for argv in (["convert", "widen", "--load", str(base / "mixtral" / "moue"), "--window", "6",
                  "--steps", "10", "--output", str(tmp_path / "w")],
                 ["export", "--load", str(base / "mixtral" / "moue"), "--submodel", "layers=1",
                  "--output", str(tmp_path / "e")]):
        assert "runs as one process" in refused(capsys, *argv)


TINY = ["model.num_layers=2", "model.activation=swiglu", "moe.router_state_dim=0",
        "moe.topology=standard", "moe.num_experts=8"]


@pytest.mark.parametrize("overrides, family, message", [
    (["moe.router_state_dim=8"], None, "trajectory state"),
    (["model.activation=gelu"], None, "SwiGLU only"),
    (["moe.shared_experts=1", "moe.shared_expert_gate=true"], "mixtral", "has no shared expert"),
    (["moe.pre_softmax=true"], "mixtral", "renormalises the top-k"),
    ([], "llama", "not a family moue writes"),
])
def test_models_no_family_holds_are_refused(overrides, family, message):
    cfg = load_config(None, [*TINY, *overrides])
    with pytest.raises(UserError, match=message):
        export_family(cfg, family)


def test_export_picks_the_family_that_holds_the_model():
    pick = lambda *o: export_family(load_config(None, [*TINY, *o]), None).model_type  # noqa: E731
    assert pick() == "mixtral"
    assert pick("model.qk_norm=true") == "qwen3_moe"
    assert pick("moe.shared_experts=2", "moe.shared_expert_gate=true") == "qwen2_moe"


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


BAD = {
    "unsupported architecture": (lambda d: _edit_config(d, model_type="llama",
                                                        architectures=["LlamaForCausalLM"]),
                                 "not a family moue converts; supported: MixtralForCausalLM"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "damaged config.json": (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(),
                   "no model.safetensors nor model.safetensors.index.json"),
    "missing shard": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})),
        "lists shard(s) model-00002-of-00002.safetensors"),
    "shapes disagree with config": (lambda d: _edit_config(d, num_key_value_heads=4),
                                    "but config.json makes it"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")),
                       "has no tensor 'model.norm.weight'"),
    "foreign tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)})), "have no place"),
    "vocabulary too large": (lambda d: _tokenizer(d, 150), "more than the model's vocab_size=100"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(),
                     "no tokenizer.json nor tokenizer.model; pass the model's tokenizer with "
                     "--tokenizer FILE"),
    "sliding window": (lambda d: _edit_config(d, use_sliding_window=True, sliding_window=8),
                       "sliding-window attention"),
    "rope scaling": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn",
                                                                "rope_theta": 1e4}),
                     "RoPE scaling 'yarn'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_imports_name_the_problem_and_write_nothing(base, tmp_path, case):
    source = tmp_path / "hf"
    shutil.copytree(base / "qwen3_moe" / "hf", source)
    spoil, message = BAD[case]
    spoil(source)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_hf(str(source), str(out), [])
    assert not out.exists()


def test_bad_import_arguments(base, tmp_path):
    with pytest.raises(UserError, match="the architecture comes from config.json"):
        import_hf(str(base / "mixtral" / "hf"), str(tmp_path / "o"), ["model.hidden_size=64"])
    with pytest.raises(UserError, match="exists; give a new directory"):
        import_hf(str(base / "mixtral" / "hf"), str(base / "mixtral" / "moue"), [])
    proc = _cli("convert", "import", "--hf", str(tmp_path / "nowhere"), "--output",
                str(tmp_path / "o"), expect=2)
    assert "no such directory" in proc.stderr and not (tmp_path / "o").exists()


def test_a_directory_without_tokenizer_imports_with_tokenizer_given(base, tmp_path):
    source, elsewhere = tmp_path / "hf", tmp_path / "tokenizer"
    shutil.copytree(base / "qwen3_moe" / "hf", source)
    (source / "tokenizer.json").unlink()
    elsewhere.mkdir()
    _tokenizer(elsewhere, 90)
    _cli("convert", "import", "--hf", str(source), "--output", str(tmp_path / "out"),
         "--tokenizer", str(elsewhere / "tokenizer.json"))
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["data"]["tokenizer"] == str((tmp_path / "out" / "tokenizer.json").resolve())
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (
        elsewhere / "tokenizer.json").read_text()


def test_imported_checkpoint_trains_on_from_its_weights(base, tmp_path):
    """moue-pretrain on the imported config resumes at step 0: its first step's loss is
    transformers' loss on the same batch (the imported weights, before any update)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base / "qwen3_moe" / "moue", ckpt)
    cfg = load_config(str(ckpt / "config.yaml"), [
        f"checkpoint.dir={ckpt}", f"logging.dir={tmp_path / 'log'}", "train.steps=1",
        "train.warmup_steps=0", "train.eval_interval=0", "train.global_batch_size=4",
        "train.micro_batch_size=2", "model.seq_length=16"])
    layout = process_groups.init_distributed(check_run(cfg, 1), device="cpu")
    try:
        trainer = train(cfg, layout, torch.device("cpu"))
        batch = [trainer.train_data[i] for i in range(4)]
    finally:
        process_groups.shutdown()
    step = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[0])
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in batch]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in batch]).long()
    model = transformers.AutoModelForCausalLM.from_pretrained(base / "qwen3_moe" / "hf")
    with torch.no_grad():
        logits = model.eval()(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert step["step"] == 1 and abs(step["loss"] - loss) <= 1e-5 * loss, (step, loss)
    assert (ckpt / "step_0000001").is_dir()


def test_bf16_weights_stay_bf16_both_ways(tmp_path):
    """A bf16 Hugging Face model imports as a model-only checkpoint of bf16 weights (no optimizer
    state) and exports back bit for bit; --dtype fp32 widens either way exactly."""
    hf = tmp_path / "hf"
    _hf_model("mixtral").to(torch.bfloat16).save_pretrained(hf)
    _tokenizer(hf, 90)
    import_hf(str(hf), str(tmp_path / "moue"), [])
    step = tmp_path / "moue" / "step_0000000"
    assert checkpoint.stored_dtype(step) == torch.bfloat16
    assert checkpoint.saved_config(step)["model_only"] is True
    stored = dist_checkpointing.load_tensors_metadata(str(step))
    assert not [k for k in stored if k.startswith("optimizer")]
    original = load_file(hf / "model.safetensors")
    for dtype, name in ((None, "bf16"), ("fp32", "fp32")):
        export_hf(str(tmp_path / "moue"), str(tmp_path / name), None, dtype)
        exported = load_file(tmp_path / name / "model.safetensors")
        assert sorted(exported) == sorted(original)
        want = torch.bfloat16 if dtype is None else torch.float32
        assert all(exported[k].dtype == want and torch.equal(exported[k], original[k].to(want))
                   for k in original)
        written = json.loads((tmp_path / name / "config.json").read_text())["dtype"]
        assert written == {"bf16": "bfloat16", "fp32": "float32"}[name]
    import_hf(str(hf), str(tmp_path / "moue32"), [], dtype="fp32")
    assert checkpoint.stored_dtype(tmp_path / "moue32" / "step_0000000") == torch.float32
    # an fp32 model (moue-eval on a CPU) loads the bf16 weights widened: transformers' fp32 loss
    tokens = np.random.default_rng(1).integers(0, 90, size=(2, 13))
    np.save(tmp_path / "tokens.npy", tokens)
    loss = evaluate_tokens(str(tmp_path / "moue"), str(tmp_path / "tokens.npy"), [])["loss"]
    logits = torch.from_numpy(_hf_logits(hf, tokens))
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                             torch.from_numpy(tokens[:, 1:]).flatten()).item()
    assert abs(loss - want) <= 1e-5 * want, (loss, want)


def test_a_bf16_run_from_an_import_keeps_its_weights_in_the_optimizer(tmp_path):
    """A bf16 run started from a model-only import must take the imported weights into its
    fp32 master copies (``reload_model_params``): a step whose update is negligible (lr 1e-30)
    leaves them as imported, where a master copy left at the run's own initialisation would
    overwrite every weight."""
    hf = tmp_path / "hf"
    _hf_model("mixtral").to(torch.bfloat16).save_pretrained(hf)
    _tokenizer(hf, 90)
    import_hf(str(hf), str(tmp_path / "moue"), [])
    cfg = load_config(str(tmp_path / "moue" / "config.yaml"), [
        "train.precision=bf16", f"logging.dir={tmp_path / 'log'}", "train.steps=1", "train.warmup_steps=0",
        "train.lr=1e-30", "train.min_lr=0", "train.eval_interval=0", "model.seq_length=16",
        "train.global_batch_size=2", "train.micro_batch_size=2"])
    layout = process_groups.init_distributed(check_run(cfg, 1), device="cpu")
    try:
        train(cfg, layout, torch.device("cpu"))
    finally:
        process_groups.shutdown()
    assert (tmp_path / "moue" / "step_0000001").is_dir()
    export_hf(str(tmp_path / "moue"), str(tmp_path / "after"), None)
    original, after = (load_file(d / "model.safetensors") for d in (hf, tmp_path / "after"))
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], original[k])
               for k in original)


def test_sharded_weights_are_read_and_written(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(5)}
    write_tensors(tmp_path, tensors, shard_bytes=600)  # 256 bytes each: 2 per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    read = Tensors(tmp_path)
    assert read.names() == set(tensors)
    assert all(torch.equal(read.get(n), t) for n, t in tensors.items())


def test_shards_take_views_and_repeated_tensors(tmp_path):
    """What ``to_hf`` hands over: halves of one tensor (written from its memory) and one tensor
    under two names (a pool expert two layers hold: copied); converted when asked."""
    fc1 = torch.arange(12.0).reshape(4, 3)
    gate, up = fc1.chunk(2)
    tensors = {"gate": gate, "up": up, "layer0.expert": fc1, "layer1.expert": fc1}
    write_tensors(tmp_path, tensors, dtype=torch.bfloat16)
    read = load_file(tmp_path / "model.safetensors")
    assert all(read[n].dtype == torch.bfloat16 and torch.equal(read[n].float(), t)
               for n, t in tensors.items())


def test_stored_dtypes_are_read_from_the_header_and_unknown_ones_named(tmp_path):
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2),
               "c": torch.zeros(2).to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    read = Tensors(tmp_path)
    assert (read.dtype("a"), read.dtype("b")) == (torch.bfloat16, torch.float32)
    with pytest.raises(UserError, match="'c' is stored as F8_E4M3; moue reads F32, BF16, F16"):
        read.dtype("c")
