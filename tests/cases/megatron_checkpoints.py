"""Cases: Megatron-LM-style torch_dist checkpoints of Megatron-Core's own GPT MoE (no moue model
code), saved from one process and from two under TP=2, PP=2 and EP=2, for
tests/test_megatron_import.py.

Each is what Megatron-LM's ``save_checkpoint`` writes (read in its source,
megatron/training/checkpointing.py): ``SAVE/iter_0000010/`` holding ``args`` (an
``argparse.Namespace`` with Megatron-LM's argument names), ``checkpoint_version``, ``iteration``
and ``model`` (the model's sharded state dict, saved with its metadata as content metadata),
and ``SAVE/latest_checkpointed_iteration.txt``. The model is built as Megatron-LM builds it
from those arguments (``core_transformer_config_from_args``: fields of the same names, plus
``num_experts``, ``swiglu``, ``group_query_attention``, ``norm_epsilon``) with Megatron's local
layer spec. Every layout holds the same weights (drawn per global key; the TP=2 save holds them
rounded to bf16, as runs with ``--bf16`` save them). The EP=2 save uses
per-expert keys (``singleton_local_shards``); the PP=2 save spells the MoE layers' pre-MLP norm
as Transformer Engine's layers do (``pre_mlp_layernorm.weight``). The one-process save also
writes Megatron's logits of ``tokens.npy``. The ``grouped_ep2`` save has Megatron's grouped
experts (``TEGroupedMLP``, as ``--moe-grouped-gemm`` builds on GPUs) with torch's grouped GEMM
standing in for Transformer Engine's ``GroupedLinear`` (``moue.model.te_standins``, which
keeps TE's checkpoint layout), so that Megatron's grouped-to-per-expert mapping is what saves.
"""

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.model.layer_specs import submodules_of, torch_grouped_experts_spec
from parallel.launch import init_model_parallel, seed_everything
from parallel.layout import ParallelLayout
from tests.distributed import Cases
from tests.equivalence import fill_by_global_key

CASES = Cases()
COMMON = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
              num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2, swiglu=True,
              normalization="RMSNorm", norm_epsilon=1e-6, position_embedding_type="rope",
              rotary_percent=1.0, add_bias_linear=False, padded_vocab_size=384, seq_length=16,
              max_position_embeddings=16, moe_router_load_balancing_type="aux_loss",
              moe_aux_loss_coeff=1e-2, tokenizer_type="HuggingFaceTokenizer",
              params_dtype=torch.bfloat16, attention_backend=AttnBackend.auto,
              transformer_impl="transformer_engine", ckpt_format="torch_dist")
VARIANTS = {
    # GQA, RoPE base 1e6, untied output layer, softmax before top-k, every layer MoE
    "gqa": dict(COMMON, group_query_attention=True, num_query_groups=2, rotary_base=1000000,
                untie_embeddings_and_output_weights=True, moe_router_pre_softmax=True,
                moe_router_score_function="softmax", moe_layer_freq=1),
    # MoE every other layer (a list, as Megatron-LM parses --moe-layer-freq), a gated shared
    # expert, per-head q/k norms, q/k/v biases, tied embeddings, sigmoid scores
    "shared": dict(COMMON, group_query_attention=False, num_query_groups=None, rotary_base=10000,
                   untie_embeddings_and_output_weights=False, moe_layer_freq=[1, 0, 1, 0],
                   moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
                   qk_layernorm=True, add_qkv_bias=True, moe_router_score_function="sigmoid",
                   moe_router_pre_softmax=False),
}
LAYOUTS = {"single": (1, 1, 1), "tp2_bf16": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2),
           "grouped_ep2": (1, 1, 2)}
SAVES = {"gqa": ("single", "tp2_bf16", "pp2", "grouped_ep2"), "shared": ("single", "ep2")}


def megatron_args(variant: str, tokenizer_model: str) -> argparse.Namespace:
    return argparse.Namespace(**VARIANTS[variant], tokenizer_model=tokenizer_model)


def _transformer_config(args: argparse.Namespace, layout: ParallelLayout) -> TransformerConfig:
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    fields = {k: v for k, v in vars(args).items() if k in names}
    fields.update(
        num_moe_experts=args.num_experts, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu, layernorm_epsilon=args.norm_epsilon,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        moe_token_dispatcher_type="alltoall")
    return TransformerConfig(**fields)


def _te_spelling(sharded: dict) -> dict:
    """Every layer of the variant saved so is MoE, whose pre-MLP norm TE's spec keeps apart."""
    for item in sharded.values():
        if "mlp.linear_fc1.layer_norm_" in getattr(item, "key", ""):
            item.key = item.key.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
    return sharded


def _save(variant: str, layout_name: str) -> dict:
    base = Path(os.environ["MOUE_MEGATRON_DIR"])
    args = megatron_args(variant, str(base / "tokenizer"))
    tp, pp, ep = LAYOUTS[layout_name]
    layout = ParallelLayout(world_size=torch.distributed.get_world_size(), tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    seed_everything(1)
    config = _transformer_config(args, layout)
    spec = get_gpt_decoder_block_spec(config, False)
    if layout_name.startswith("grouped"):  # --moe-grouped-gemm: Megatron's TEGroupedMLP
        config.moe_grouped_gemm = True
        for layer in spec.layer_specs:
            submodules_of(layer.submodules.mlp).experts = torch_grouped_experts_spec()
    model = GPTModel(config=config, transformer_layer_spec=spec,
                     vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type="rope", rotary_base=args.rotary_base)
    fill_by_global_key(model, seed=11)
    if layout_name.endswith("bf16"):  # as GPU runs save their weights (--bf16)
        model.to(torch.bfloat16)
    metadata = {"singleton_local_shards": True} if layout_name == "ep2" else {}
    sharded = model.sharded_state_dict(metadata=metadata)
    if layout_name == "pp2":
        _te_spelling(sharded)
    save = base / variant / layout_name
    iteration = save / "iter_0000010"
    if torch.distributed.get_rank() == 0:
        iteration.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"args": args, "checkpoint_version": 3.0, "iteration": 10,
                             "model": sharded}, str(iteration), content_metadata=metadata or None)
    if torch.distributed.get_rank() == 0:
        (save / "latest_checkpointed_iteration.txt").write_text("10")
        if layout_name == "single":
            tokens = torch.from_numpy(np.load(base / "tokens.npy"))[:, :-1]
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            with torch.no_grad():
                logits = model.eval()(tokens, positions, attention_mask=None)
            np.save(base / variant / "reference_logits.npy", logits.float().numpy())
    torch.distributed.barrier()
    return {"keys": sorted(v.key for v in sharded.values() if hasattr(v, "key")),
            "experts": type(model.decoder.layers[0].mlp.experts).__name__}  # layer 0 is MoE


for _variant, _layouts in SAVES.items():
    for _layout in _layouts:
        CASES.add(f"save[{_variant}-{_layout}]", lambda v=_variant, lay=_layout: _save(v, lay),
                  nproc=1 if _layout == "single" else 2)
