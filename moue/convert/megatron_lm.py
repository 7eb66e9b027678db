"""``moue-convert import --megatron``: a Megatron-LM (Megatron-Core GPT) MoE checkpoint.

Megatron-LM saves ``torch_dist`` checkpoints as ``SAVE/iter_NNNNNNN/`` (or ``SAVE/release/``)
with ``SAVE/latest_checkpointed_iteration.txt`` naming the newest; its common (non-tensor)
state (``common.pt``, or inside the DCP files with newer megatron-core such as 0.19) holds
the run's arguments (``args``, an ``argparse.Namespace`` whose names are Megatron's
``TransformerConfig`` fields plus a few of its own: ``num_experts``, ``swiglu``,
``untie_embeddings_and_output_weights``, ``padded_vocab_size`` ...). The architecture is read
from those arguments; the weights through Megatron-Core itself: its GPT model is built with the
same config on one CPU process (local layers, one module per expert) and loaded with
``dist_checkpointing``, which reshards whatever tensor, pipeline and expert parallelism the run
used. Megatron keeps a checkpoint's expert weights in the same form whether the run used
``SequentialMLP`` or grouped GEMMs, and the metadata saved with the checkpoint (per-expert keys
or not) is passed back when loading.

Two key spellings differ between Megatron's local and Transformer Engine layers in MoE layers:
the norm before the experts is ``pre_mlp_layernorm.weight`` with Transformer Engine and
``mlp.linear_fc1.layer_norm_weight`` with local layers (``input_layernorm`` likewise, as
``self_attention.linear_qkv.layer_norm_weight``); each requested key is matched to the spelling
the checkpoint holds.

The model is then moue's standard topology: MoE layer ``i``'s expert ``j`` is pool expert
``i*N + j`` and every other tensor keeps its name. Anything moue's model does not have (Multi-
Latent Attention, biases on every linear, learned positions, ...) is refused by name.
"""

from __future__ import annotations

import enum
import re
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from torch.distributed.checkpoint.api import CheckpointException

from moue.checkpoint import EMBEDDING_KEY
from moue.commands.standalone import DTYPES
from moue.config import RunConfig
from moue.convert.importing import check_overrides, check_tokenizer, new_output, write_imported
from moue.model.megatron_config import transformer_config
from moue.run_check import check_run, plan_run
from parallel.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
EXPERT_KEY = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)")
# The same tensor under local and Transformer Engine layers (module docstring).
KEY_SPELLINGS = (("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
                 ("self_attention.linear_qkv.layer_norm_", "input_layernorm."))
BALANCE = {"aux_loss": "per_layer", "seq_aux_loss": "per_layer", "global_aux_loss": "per_layer",
           "none": "none"}


def iteration_dir(path: str) -> Path:
    """The ``torch_dist`` checkpoint of ``--megatron``: a save directory (its tracker file names
    the iteration) or one ``iter_N`` / ``release`` directory."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"--megatron {root}: no such directory; give Megatron-LM's --save "
                        f"directory (with {TRACKER}) or one of its iter_N directories")
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None:
            raise UserError(f"{tracker}: {text!r} is neither an iteration nor 'release'; the "
                            "file is damaged: write the iteration to import into it")
        root = root / name
    if dist_checkpointing.check_is_distributed_checkpoint(str(root)):
        return root
    if any(root.glob("mp_rank_*")):
        raise UserError(f"--megatron {root}: a legacy 'torch' checkpoint (mp_rank_* files); "
                        "moue reads torch_dist checkpoints: convert it with Megatron-LM "
                        "(--ckpt-convert-format torch_dist --ckpt-convert-save DIR) first")
    raise UserError(f"--megatron {root}: not a Megatron distributed checkpoint (no "
                    "metadata.json); give the --save directory or an iter_N directory in it")


def _cause(err: Exception) -> str:
    """The line of a load error that says what failed: torch's weights-only unpickler opens with
    a paragraph of advice and names the offending global further down."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch's rewrapped message: what follows says it
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    return (named or lines or [repr(err)])[0][:300]


def _enum_member(cls, name):
    """``getattr(cls, name)`` as the unpickler may call it, for enum classes only.

    Python 3.11.0 to 3.11.4 (Debian 12's 3.11.2 among them) pickle an enum member as
    ``getattr(EnumClass, 'NAME')``, so Megatron-LM's arguments saved there (``attention_backend``
    is an ``AttnBackend``) name ``builtins.getattr``, which torch's weights-only unpickler refuses:
    it could reach anything. The class itself has already passed the unpickler's allow-list
    (Megatron-Core registers its enums), so a member looked up by name is as safe as the class."""
    # ValueError, not pickle.UnpicklingError: torch rewraps the latter in a paragraph of advice
    # (to load with weights_only=False) that would hide what was refused.
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise ValueError(f"getattr({cls!r}, {name!r}): only enum members are read")
    try:
        return cls[name]
    except KeyError:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} has no member {name!r} in the "
                         "installed megatron-core (saved by a newer Megatron-LM?)") from None


ENUMS_BY_NAME = torch.serialization.safe_globals([(_enum_member, "builtins.getattr")])


def read_args(ckpt: Path) -> Namespace:
    """The run's arguments saved in the checkpoint's common state."""
    try:
        with ENUMS_BY_NAME:
            common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as err:
        raise UserError(f"--megatron {ckpt}: cannot read its common state, which holds the run's "
                        f"arguments ({type(err).__name__}: {_cause(err)}); it is damaged or was "
                        "written by a newer Megatron-LM than megatron-core can read here") from None
    args = common.get("args")
    if not isinstance(args, Namespace):
        raise UserError(f"--megatron {ckpt}: holds no Megatron-LM arguments ('args'), "
                        "which say the architecture; only checkpoints saved by Megatron-LM's "
                        "training loop (pretrain_gpt.py) can be imported")
    return args


def _arg(args: Namespace, name: str, default=None):
    return getattr(args, name, default)


def _need(args: Namespace, name: str, where: str):
    value = getattr(args, name, None)
    if value is None:
        raise UserError(f"{where}: has no {name!r}, which every Megatron-LM GPT run records; the "
                        "arguments are incomplete: give a checkpoint saved by pretrain_gpt.py")
    return value


def _refuse(args: Namespace, where: str) -> None:
    """Name every argument whose model moue's architecture cannot express."""
    checks = [
        (_arg(args, "multi_latent_attention"), "multi_latent_attention=True (Multi-Latent "
         "Attention is not built in moue)"),
        (_arg(args, "add_bias_linear", True), "add_bias_linear=True (biases on every linear; "
         "moue's linears have none: train with --disable-bias-linear)"),
        (_arg(args, "position_embedding_type", "learned_absolute") != "rope",
         f"position_embedding_type={_arg(args, 'position_embedding_type', 'learned_absolute')!r}"
         " (moue uses RoPE)"),
        (_arg(args, "rotary_percent", 1.0) != 1.0, f"rotary_percent="
         f"{_arg(args, 'rotary_percent')} (moue rotates every channel)"),
        (_arg(args, "rotary_interleaved"), "rotary_interleaved=True"),
        (_arg(args, "use_rope_scaling"), "use_rope_scaling=True (plain RoPE only)"),
        (_arg(args, "squared_relu") or _arg(args, "quick_geglu"), "an activation other than "
         "GeLU or SwiGLU"),
        (_arg(args, "apply_layernorm_1p") or _arg(args, "layernorm_zero_centered_gamma"),
         "zero-centred norm weights (apply_layernorm_1p)"),
        (_arg(args, "qk_l2_norm"), "qk_l2_norm=True"),
        (_arg(args, "window_size") is not None, f"window_size={_arg(args, 'window_size')} "
         "(sliding-window attention)"),
        (_arg(args, "mtp_num_layers"), f"mtp_num_layers={_arg(args, 'mtp_num_layers')} "
         "(multi-token prediction heads)"),
        (_arg(args, "heterogeneous_layers_config_path"), "heterogeneous layers"),
        (_arg(args, "softmax_type", "vanilla") != "vanilla",
         f"softmax_type={_arg(args, 'softmax_type')!r}"),
        (_arg(args, "moe_router_num_groups"), "moe_router_num_groups (group-limited routing)"),
        (_arg(args, "moe_router_topk_scaling_factor") not in (None, 1.0),
         f"moe_router_topk_scaling_factor={_arg(args, 'moe_router_topk_scaling_factor')}"),
        (_arg(args, "moe_router_enable_expert_bias"), "moe_router_enable_expert_bias=True (the "
         "aux-loss-free selection bias is not imported)"),
        (any(kind not in BALANCE for kind in _balance_kinds(args)),
         f"moe_router_load_balancing_type={_arg(args, 'moe_router_load_balancing_type')!r} "
         "(it changes which experts are chosen)"),
    ]
    bad = [text for failed, text in checks if failed]
    if bad:
        raise UserError(f"{where}: this Megatron model has {'; '.join(bad)}: moue's model cannot "
                        "hold it (docs/conversion.md lists what Megatron checkpoints import)")


def _moe_layer_freq(args: Namespace, where: str) -> int:
    freq = _arg(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return freq
    pattern = [int(bool(x)) for x in freq]
    for k in range(1, len(pattern) + 1):
        if pattern == [int(i % k == 0) for i in range(len(pattern))]:
            return k
    raise UserError(f"{where}: moe_layer_freq={pattern} makes layers "
                    f"{[i for i, x in enumerate(pattern) if x]} MoE; moue's MoE layers are every "
                    "k-th layer from layer 0 (model.moe_layer_freq)")


def _balance_kinds(args: Namespace) -> list[str]:
    """Megatron's balance losses: one name, or a list (newer Megatron-LM combines several)."""
    kinds = _arg(args, "moe_router_load_balancing_type", "aux_loss")
    return list(kinds) if isinstance(kinds, list | tuple) else [kinds]


def _balance(args: Namespace) -> tuple[str, float]:
    """moue's ``moe.balance`` and its coefficient: the per-layer loss at Megatron's first
    coefficient (moue has one balance loss; the others are a training choice, not weights)."""
    kinds = [k for k in _balance_kinds(args) if BALANCE[k] != "none"]
    coeff = _arg(args, "moe_aux_loss_coeff", 0.0) or 0.0
    coeff = float(coeff[0] if isinstance(coeff, list | tuple) else coeff)
    return ("per_layer", coeff) if kinds else ("none", 0.0)


def moue_sections(args: Namespace, where: str) -> dict:
    """moue's ``model`` and ``moe`` sections (a standard topology) for Megatron-LM's ``args``."""
    n = _arg(args, "num_experts")
    if not n:
        raise UserError(f"{where}: num_experts is not set: a dense model; moue-convert imports "
                        "MoE checkpoints")
    _refuse(args, where)
    layers, hidden = _need(args, "num_layers", where), _need(args, "hidden_size", where)
    heads = _need(args, "num_attention_heads", where)
    ffn = _need(args, "ffn_hidden_size", where)
    head_dim = _arg(args, "kv_channels") or hidden // heads
    freq = _moe_layer_freq(args, where)
    expert_size = _arg(args, "moe_ffn_hidden_size") or ffn
    shared = _arg(args, "moe_shared_expert_intermediate_size") or 0
    if shared % expert_size:
        raise UserError(f"{where}: moe_shared_expert_intermediate_size={shared} is not a multiple "
                        f"of moe_ffn_hidden_size={expert_size}; moue's shared experts are whole "
                        "experts (moe.shared_experts x moe.expert_ffn_hidden_size)")
    epsilon = _arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5))
    model = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                 num_query_groups=(_need(args, "num_query_groups", where)
                                   if _arg(args, "group_query_attention") else None),
                 head_dim=None if head_dim * heads == hidden else head_dim,
                 vocab_size=_need(args, "padded_vocab_size", where),
                 seq_length=_need(args, "seq_length", where), ffn_hidden_size=ffn,
                 moe_layer_freq=freq,
                 normalization=_arg(args, "normalization", "LayerNorm"),
                 activation="swiglu" if _arg(args, "swiglu") else "gelu",
                 rope_base=float(_arg(args, "rotary_base", 10000)), norm_epsilon=float(epsilon),
                 qk_norm=bool(_arg(args, "qk_layernorm")), qkv_bias=bool(_arg(args, "add_qkv_bias")),
                 tie_embeddings=not _arg(args, "untie_embeddings_and_output_weights", False))
    n_moe = len(range(0, layers, freq))
    balance, coeff = _balance(args)
    moe = dict(num_experts=n_moe * n, expert_ffn_hidden_size=expert_size,
               topk=_arg(args, "moe_router_topk", 2), topology="standard", window=n, stride=n,
               shared_experts=shared // expert_size,
               shared_expert_gate=bool(shared and _arg(args, "moe_shared_expert_gate")),
               router_state_dim=0,
               score_function=_arg(args, "moe_router_score_function", "softmax"),
               pre_softmax=bool(_arg(args, "moe_router_pre_softmax")),
               balance=balance, balance_coeff=coeff,
               z_loss_coeff=float(_arg(args, "moe_z_loss_coeff") or 0.0))
    return {"model": model, "moe": moe}


def megatron_model(cfg: RunConfig, experts_per_layer: int) -> GPTModel:
    """Megatron-Core's own GPT MoE for ``cfg`` (standard topology) on this process: local
    layers, one module per expert, as Megatron-LM builds it with ``--transformer-impl local``."""
    moe = replace(cfg.moe, num_experts=experts_per_layer)
    config = transformer_config(cfg.model, moe, check_run(cfg, 1), plan_run(cfg),
                                device=torch.device("cpu"), train=cfg.train)
    return GPTModel(config=config,
                    transformer_layer_spec=get_gpt_decoder_block_spec(config, False),
                    vocab_size=cfg.model.vocab_size, max_sequence_length=cfg.model.seq_length,
                    share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                    position_embedding_type="rope", rotary_base=cfg.model.rope_base)


def _wanted(model: GPTModel, ckpt: Path) -> dict:
    """The model's sharded state dict (weights only), each key spelled as ``ckpt`` holds it;
    tensors the checkpoint lacks or holds in another shape are named."""
    metadata = dist_checkpointing.load_content_metadata(str(ckpt)) or {}
    sharded = model.sharded_state_dict(metadata=metadata)
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt))
    wanted, problems = {}, []
    for name, item in sharded.items():
        if not isinstance(item, ShardedTensor | ShardedTensorFactory):
            continue  # _extra_state objects: Transformer Engine's FP8 metadata, not weights
        for local, te in KEY_SPELLINGS:
            if item.key not in stored and local in item.key:
                item.key = item.key.replace(local, te)
        for tensor in _stored_form(item):
            saved = stored.get(tensor.key)
            if saved is None:
                problems.append(f"{tensor.key} is missing")
            elif tuple(saved.global_shape) != tuple(tensor.global_shape):
                problems.append(f"{tensor.key} is {list(saved.global_shape)}, not "
                                f"{list(tensor.global_shape)}")
        wanted[name] = item
    if problems:
        raise UserError(f"--megatron {ckpt}: the weights disagree with the model its own arguments "
                        f"describe: {'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''}; the checkpoint is incomplete or "
                        "its arguments belong to another run")
    return wanted


def _stored_form(item) -> list[ShardedTensor]:
    """A sharded tensor, or what a factory builds (a SwiGLU ``fc1`` saved per expert is two
    tensors, ``weight_w`` and ``weight_v``)."""
    if isinstance(item, ShardedTensor):
        return [item]
    return list(nested_values(item.build()))


def to_moue(megatron_state: dict, cfg: RunConfig, module: torch.nn.Module, where: str) -> dict:
    """moue's one-process state_dict for ``module`` from Megatron's GPT state_dict (standard
    topology); every parameter of ``module`` must be given."""
    expected = module.state_dict()
    n = cfg.topology().window
    moe_layers = cfg.model.moe_layers
    state = {}
    for name, value in megatron_state.items():
        if name.endswith("_extra_state"):
            continue
        match = EXPERT_KEY.fullmatch(name)
        if match:
            layer, j, rest = int(match[1]), int(match[2]), match[3]
            name = f"decoder.expert_pool.local_experts.{moe_layers.index(layer) * n + j}.{rest}"
        if name not in expected or expected[name].shape != value.shape:
            raise UserError(f"{where}: tensor {name} {list(value.shape)} has no place in the moue "
                            "model its arguments describe; report this with the arguments")
        state[name] = value
    unset = sorted({name for name, _ in module.named_parameters()} - state.keys())
    if unset:
        raise UserError(f"{where}: gives no {unset[:3]}{' ...' if len(unset) > 3 else ''} of the "
                        "moue model its arguments describe; report this with the arguments")
    return state


def import_megatron(path: str, output: str, overrides: list[str], tokenizer: str | None,
                    dtype: str | None = None) -> Path:
    """Convert Megatron-LM's checkpoint ``path`` into the moue checkpoint ``output``, its weights
    in ``dtype`` (``bf16`` or ``fp32``; None: the checkpoint's own)."""
    out, tmp = new_output(output, "--output")
    check_overrides(overrides, "the checkpoint's arguments")
    ckpt = iteration_dir(path)
    args = read_args(ckpt)
    where = f"{ckpt} (its Megatron-LM arguments)"
    tree = moue_sections(args, where)
    tokenizer = tokenizer or _run_tokenizer(args, ckpt)
    check_tokenizer(tokenizer, tree["model"]["vocab_size"], where)

    def fill(cfg: RunConfig, module: torch.nn.Module) -> None:
        model = megatron_model(cfg, cfg.topology().window)
        try:
            with ENUMS_BY_NAME:  # the common state is read again
                loaded = dist_checkpointing.load(_wanted(model, ckpt), str(ckpt))
        except UserError:
            raise
        except (Exception, CheckpointException) as err:  # torch's is a BaseException
            raise UserError(f"--megatron {ckpt}: its weights do not load into the model its "
                            f"arguments describe ({type(err).__name__}: {_cause(err)})") from None
        unloaded = [k for k in model.load_state_dict(loaded, strict=False).missing_keys
                    if not k.endswith("_extra_state")]  # _wanted leaves those out
        if unloaded:
            raise RuntimeError(f"Megatron's sharded state dict did not give {unloaded[:3]}")
        module.load_state_dict({**module.state_dict(),
                                **to_moue(model.state_dict(), cfg, module, str(ckpt))})

    try:
        weights = dist_checkpointing.load_tensors_metadata(str(ckpt)).get(EMBEDDING_KEY)
    except (Exception, CheckpointException) as err:
        raise UserError(f"--megatron {ckpt}: cannot read its shards' metadata "
                        f"({type(err).__name__}: {_cause(err)}); it is damaged or incomplete: "
                        "copy it again") from None
    return write_imported(out, tmp, tree, tokenizer, overrides, fill,
                          {"megatron": str(ckpt.resolve()), "iteration": ckpt.name,
                           "args": {k: v for k, v in vars(args).items()
                                    if isinstance(v, str | int | float | bool | None)}},
                          dtype=DTYPES[dtype] if dtype else
                          weights.dtype if weights is not None else torch.float32)


def _run_tokenizer(args: Namespace, ckpt: Path) -> str:
    """The run's own tokenizer when it is a local file moue reads, else a ``UserError``."""
    model = _arg(args, "tokenizer_model")
    if model:
        candidate = Path(model)
        if candidate.is_dir():
            candidate = candidate / "tokenizer.json"
        if candidate.is_file() and candidate.suffix in (".json", ".model"):
            return str(candidate)
    raise UserError(f"--megatron {ckpt}: the run's tokenizer (tokenizer_type="
                    f"{_arg(args, 'tokenizer_type')!r}, tokenizer_model={model!r}) is not a "
                    "tokenizer.json or .model file here; give it with --tokenizer PATH (or "
                    "--tokenizer byte for byte-level ids)")
