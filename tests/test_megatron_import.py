"""``moue-convert import --megatron`` against Megatron-Core's own GPT MoE: Megatron-LM-style
checkpoints (tests/cases/megatron_checkpoints.py) imported into moue give Megatron's logits, the
same moue weights whatever layout saved them (TP=2, PP=2 with Transformer Engine's key spelling,
EP=2 with per-expert keys), and bad inputs are named with nothing left under the output name."""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from moue.commands.evaluate import evaluate_tokens
from moue.convert import megatron_lm
from moue.convert.megatron_lm import import_megatron, moue_sections
from parallel.errors import UserError
from tests.cases.megatron_checkpoints import SAVES, VARIANTS
from tests.distributed import launch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
TOL = 1e-5  # fp32
pytestmark = pytest.mark.compat  # Megatron's checkpoint format and loading, on 0.19 too


def _tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer, models

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {f"t{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """VARIANT/LAYOUT/: Megatron-LM save directories; VARIANT/reference_logits.npy; tokens.npy
    [2, 13]; tokenizer/ (the runs' tokenizer_model); VARIANT/LAYOUT.moue: the imports."""
    base = tmp_path_factory.mktemp("megatron")
    np.save(base / "tokens.npy", np.random.default_rng(0).integers(0, 250, size=(2, 13)))
    _tokenizer(base / "tokenizer", 250)
    env = (("MOUE_MEGATRON_DIR", str(base)),)
    for nproc in (1, 2):
        launch("tests.cases.megatron_checkpoints", nproc, env_vars=env)
    for variant, layouts in SAVES.items():
        for layout in layouts:
            if (variant, layout) != ("gqa", "single"):  # that one by the CLI, below
                import_megatron(str(base / variant / layout), str(base / variant / f"{layout}.moue"),
                                [], None)
    return base


def _cli(*args, expect=0):
    proc = subprocess.run([sys.executable, "-m", "moue.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _model_tensors(ckpt: Path, scratch: Path) -> dict:
    """The model tensors of a moue checkpoint, read without a process group."""
    dcp_to_torch_save(str(next(ckpt.glob("step_*"))), str(scratch))
    return {k: v for k, v in torch.load(scratch, weights_only=False).items()
            if torch.is_tensor(v) and not k.startswith("optimizer")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_gives_megatrons_logits(base, variant):
    ckpt = base / variant / "single.moue"
    if variant == "gqa":  # the command as a user runs it
        proc = _cli("convert", "import", "--megatron", str(base / variant / "single"),
                    "--output", str(ckpt))
        assert "moue-pretrain --config" in proc.stdout
    out = base / variant / "moue_logits.npy"
    loss = evaluate_tokens(str(ckpt), str(base / "tokens.npy"), [], str(out))["loss"]
    reference = np.load(base / variant / "reference_logits.npy")
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(reference).flatten(0, 1),
        torch.from_numpy(np.load(base / "tokens.npy"))[:, 1:].flatten()).item()
    assert abs(loss - expected) <= 1e-5 * expected, (loss, expected)
    diff = np.abs(np.load(out) - reference).max()
    print(f"{variant}: max |logit difference| vs Megatron {diff:.2e}, "
          f"largest logit {np.abs(reference).max():.2f}")
    assert diff <= TOL, diff
    config = (ckpt / "config.yaml").read_text()
    assert "topology: standard" in config and "tokenizer.json" in config
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "source.json").exists()


@pytest.mark.parametrize("variant, layout", [("gqa", "tp2_bf16"), ("gqa", "pp2"), ("shared", "ep2"),
                                             ("gqa", "grouped_ep2")])
def test_every_saving_layout_gives_the_same_weights(base, tmp_path, variant, layout):
    saved = launch("tests.cases.megatron_checkpoints", 2,
                   env_vars=(("MOUE_MEGATRON_DIR", str(base)),))[f"save[{variant}-{layout}]"][0]
    keys = saved["keys"]
    assert saved["experts"] == ("TEGroupedMLP" if layout.startswith("grouped") else "SequentialMLP")
    if layout == "pp2":  # the fixture wrote what it claims
        assert "decoder.layers.pre_mlp_layernorm.weight" in keys
    if layout == "ep2":
        assert "decoder.layers.0.mlp.experts.experts.1.linear_fc2.weight" in keys, keys
    single = _model_tensors(base / variant / "single.moue", tmp_path / "single.pt")
    other = _model_tensors(base / variant / f"{layout}.moue", tmp_path / "other.pt")
    assert sorted(single) == sorted(other)
    if layout.endswith("bf16"):  # saved in bf16: moue holds them in fp32, rounded alike
        single = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in single.items()}
    unequal = [k for k in single if not torch.equal(single[k], other[k])]
    assert not unequal, unequal


def test_architecture_maps_to_moue_sections():
    args = argparse.Namespace(**VARIANTS["shared"], tokenizer_model=None)
    tree = moue_sections(args, "here")
    assert tree["model"]["moe_layer_freq"] == 2 and tree["model"]["tie_embeddings"]
    assert tree["model"]["qk_norm"] and tree["model"]["qkv_bias"]
    assert tree["moe"]["num_experts"] == 2 * 4
    assert (tree["moe"]["window"], tree["moe"]["shared_experts"]) == (4, 2)
    assert tree["moe"]["shared_expert_gate"] and tree["moe"]["score_function"] == "sigmoid"
    assert (tree["moe"]["balance"], tree["moe"]["balance_coeff"]) == ("per_layer", 1e-2)


@pytest.mark.parametrize("kinds, coeff, expected", [
    (["seq_aux_loss", "global_aux_loss"], [1e-3, 1e-4], ("per_layer", 1e-3)),
    ("none", 0.0, ("none", 0.0)),
])
def test_balance_losses_map_to_moues_one(kinds, coeff, expected):
    args = argparse.Namespace(**{**VARIANTS["gqa"], "moe_router_load_balancing_type": kinds,
                                 "moe_aux_loss_coeff": coeff})
    moe = moue_sections(args, "here")["moe"]
    assert (moe["balance"], moe["balance_coeff"]) == expected


def test_routing_moue_does_not_have_is_refused():
    args = argparse.Namespace(**{**VARIANTS["gqa"], "moe_router_load_balancing_type": "sinkhorn",
                                 "moe_router_num_groups": 2})
    with pytest.raises(UserError, match=r"group-limited routing\); moe_router_load_balancing_type"
                                        "='sinkhorn'"):
        moue_sections(args, "here")


def _copy(base: Path, tmp: Path) -> Path:
    target = tmp / "save"
    shutil.copytree(base / "gqa" / "single", target)
    return target


def _edit_args(monkeypatch, drop: bool = False, **changes) -> None:
    """The checkpoint's arguments read as if saved with ``changes`` (or without them): where
    they live differs between megatron-core versions (common.pt, or inside the DCP files)."""
    read = megatron_lm.dist_checkpointing.load_common_state_dict

    def edited(path):
        common = dict(read(path))
        if drop:
            del common["args"]
        else:
            common["args"] = argparse.Namespace(**{**vars(common["args"]), **changes})
        return common

    monkeypatch.setattr(megatron_lm.dist_checkpointing, "load_common_state_dict", edited)


BAD = {
    "no directory": (lambda s, m: shutil.rmtree(s), [], "no such directory"),
    "not a checkpoint": (lambda s, m: shutil.rmtree(s / "iter_0000010"), [],
                         "not a Megatron distributed checkpoint"),
    "legacy format": (lambda s, m: (shutil.rmtree(s / "iter_0000010"),
                                 (s / "iter_0000010" / "mp_rank_00").mkdir(parents=True)), [],
                      "legacy 'torch' checkpoint"),
    "damaged tracker": (lambda s, m: (s / "latest_checkpointed_iteration.txt").write_text("ten"), [],
                        "neither an iteration"),
    "no args": (lambda s, m: _edit_args(m, drop=True), [], "no Megatron-LM arguments"),
    "dense": (lambda s, m: _edit_args(m, num_experts=None), [], "dense model"),
    "incomplete args": (lambda s, m: _edit_args(m, padded_vocab_size=None), [],
                        "has no 'padded_vocab_size'"),
    "MLA and biases": (lambda s, m: _edit_args(m, multi_latent_attention=True, add_bias_linear=True),
                       [], "multi_latent_attention=True .*add_bias_linear=True"),
    "learned positions": (lambda s, m: _edit_args(m, position_embedding_type="learned_absolute"), [],
                          "position_embedding_type='learned_absolute'"),
    "layer pattern": (lambda s, m: _edit_args(m, moe_layer_freq=[0, 1, 1, 1]), [],
                      "makes layers \\[1, 2, 3\\] MoE"),
    "more layers than saved": (lambda s, m: _edit_args(m, num_layers=6), [],
                               r"linear_qkv.weight is \[4, 64, 32\], not \[6, 64, 32\]"),
    "wider experts than saved": (lambda s, m: _edit_args(m, moe_ffn_hidden_size=24), [],
                                 r"linear_fc2.weight is \[4, 4, 32, 16\], not \[4, 4, 32, 24\]"),
    "tokenizer not here": (lambda s, m: _edit_args(m, tokenizer_model="/nowhere/tok"), [],
                           "give it with --tokenizer"),
    "tokenizer too large": (lambda s, m: _tokenizer(s / "big", 400), ["--tokenizer", "big"],
                            "400 tokens, more than the model's vocab_size=384"),
    "architecture override": (lambda s, m: None, ["model.hidden_size=64"],
                              "architecture comes from the checkpoint's arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_megatron_inputs_are_named_and_nothing_is_written(base, tmp_path, monkeypatch, case):
    edit, extra, message = BAD[case]
    save = _copy(base, tmp_path)
    edit(save, monkeypatch)
    tokenizer = str(save / "big" / "tokenizer.json") if "--tokenizer" in extra else None
    overrides = [x for x in extra if "=" in x]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        import_megatron(str(save), str(out), overrides, tokenizer)
    assert not out.exists()


def test_tokenizer_flag_and_existing_output_on_the_command_line(base, tmp_path):
    proc = _cli("convert", "import", "--megatron", str(base / "gqa" / "single"), "--output",
                str(tmp_path / "byte"), "--tokenizer", "byte")
    assert "data.tokenizer" not in proc.stderr
    assert "tokenizer: byte" in (tmp_path / "byte" / "config.yaml").read_text()
    proc = _cli("convert", "import", "--megatron", str(base / "gqa" / "single"), "--output",
                str(tmp_path / "byte"), expect=2)  # a real process's exit status
    assert "exists" in proc.stderr


class _PickledByName:
    """Pickles as Python 3.11.0-3.11.4 pickle an enum member: ``getattr(EnumClass, 'NAME')``."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_arguments_saved_by_a_python_that_pickles_enums_by_name_are_read(tmp_path):
    """Debian 12's Python 3.11.2 saves Megatron-LM's ``attention_backend`` as ``getattr(AttnBackend,
    'flash')``, which torch's weights-only load refuses; the importer reads enum members so named,
    and only those."""
    from megatron.core.safe_globals import register_safe_globals
    from megatron.core.transformer.enums import AttnBackend

    register_safe_globals()
    path = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(attention_backend=_PickledByName(AttnBackend, "flash"))},
               path)
    with pytest.raises(Exception, match="GLOBAL builtins.getattr|GLOBAL getattr") as plain:
        torch.load(path)  # what Megatron-Core's own loader does
    assert "getattr" in megatron_lm._cause(plain.value)  # not torch's opening advice
    with megatron_lm.ENUMS_BY_NAME:
        assert torch.load(path)["args"].attention_backend is AttnBackend.flash
    # getattr on anything but an enum class stays refused, naming what was asked for.
    torch.save({"args": _PickledByName(argparse.Namespace, "__init__")}, path)
    with megatron_lm.ENUMS_BY_NAME, pytest.raises(ValueError, match="only enum members are read"):
        torch.load(path)
    torch.save({"args": _PickledByName(AttnBackend, "nope")}, path)  # a member this one lacks
    with megatron_lm.ENUMS_BY_NAME, pytest.raises(ValueError, match="AttnBackend has no member "
                                                                    "'nope' in the installed"):
        torch.load(path)
