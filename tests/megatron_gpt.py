"""A small training harness for the equivalence tests, on the Trainer's engine.

``train(build_fn, layout)`` trains any GPTModel a builder returns with ``moue.training.engine``
(Megatron DDP, its distributed optimizer, its schedules: what ``moue-pretrain`` steps). ``megatron_builder`` gives the
reference workload of the foundation tests: pure Megatron-Core GPT with MoE (no MoUE code), so
that a difference between layouts is a fault of the parallel stack or of the CPU backend.

Every layout starts from the same weights: each parameter is filled from its *global*
checkpoint key (Megatron's ``sharded_state_dict`` gives key, global shape and this rank's
offsets), so tensor, expert and pipeline sharding all slice the same full tensors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.config import TrainConfig
from moue.model.init import sharded_parameters
from moue.model.layer_specs import gpt_block_spec
from moue.training.engine import build_engine
from parallel.launch import init_model_parallel, seed_everything
from parallel.layout import ParallelLayout
from parallel.reduce import step_mean, tracked_moe_values


@dataclass(frozen=True)
class TinyGPT:
    num_layers: int = 4
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    num_experts: int = 4
    topk: int = 2
    seq_length: int = 16
    vocab_size: int = 128
    micro_batch_size: int = 1
    global_batch_size: int = 4
    dispatcher: str = "alltoall"
    aux_loss_coeff: float = 1e-2
    swiglu: bool = False
    grad_accum_fusion: bool = False  # Megatron's linears write main_grad (apex's kernel)


def transformer_config(shape: TinyGPT, layout: ParallelLayout) -> TransformerConfig:
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads, ffn_hidden_size=shape.ffn_hidden_size,
        num_moe_experts=shape.num_experts, moe_router_topk=shape.topk,
        moe_ffn_hidden_size=shape.ffn_hidden_size, moe_token_dispatcher_type=shape.dispatcher,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=shape.aux_loss_coeff,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        gradient_accumulation_fusion=shape.grad_accum_fusion, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        gated_linear_unit=shape.swiglu,
        activation_func=torch.nn.functional.silu if shape.swiglu else torch.nn.functional.gelu,
    )


def fill_by_global_key(model: torch.nn.Module, seed: int, aliases: dict | None = None) -> int:
    """Give every parameter values drawn from its global checkpoint key; returns #tensors set.

    Buffers (e.g. the balance state) keep their initial values. ``aliases`` maps a key to
    ``(source_key, source_global_shape)``: the values of another model's key, reshaped (how the
    MoUE pool [L*N, ...] takes a standard MoE's per-layer experts [L, N, ...]).
    """
    count = 0
    params = {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        for sh, param in sharded_parameters(model.sharded_state_dict().values()):
            if torch.is_tensor(param) and param.data_ptr() in params:
                _fill(sh, seed, aliases)
                count += 1
    return count


def _fill(sh, seed: int, aliases: dict | None) -> None:
    """This rank's slice of the full tensor drawn for the key of the sharded tensor ``sh``."""
    key, shape = (aliases or {}).get(sh.key, (sh.key, sh.global_shape))
    g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    full = torch.randn(shape, generator=g).reshape(sh.global_shape)
    full = 1.0 + 0.1 * full if len(sh.global_shape) - sh.prepend_axis_num == 1 else 0.05 * full
    local_shape = (1,) * sh.prepend_axis_num + tuple(sh.data.shape)
    index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local_shape, strict=True))
    sh.data.copy_(full[index].reshape(sh.data.shape))


def batch(data: Data, step: int) -> torch.Tensor:
    """The global batch of a step: [global_batch_size, seq_length + 1] token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, data.vocab_size, (data.global_batch_size, data.seq_length + 1),
                         generator=g)


@dataclass(frozen=True)
class Data:
    vocab_size: int
    seq_length: int
    global_batch_size: int = 4
    micro_batch_size: int = 1


def _device() -> torch.device:
    """cuda when the run communicates over nccl (a GPU run), else cpu."""
    return torch.device("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")


def _microbatches(data: Data, step: int):
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = data.global_batch_size // dp
    tokens = batch(data, step)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    for i in range(0, per_rank, data.micro_batch_size):
        chunk = tokens[i:i + data.micro_batch_size].to(_device())
        yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:]}


def _forward_step(data_iterator, model):
    mb = next(data_iterator)
    positions = torch.arange(mb["tokens"].shape[1], device=mb["tokens"].device)
    positions = positions.unsqueeze(0).expand_as(mb["tokens"])
    per_token = model(mb["tokens"], positions, attention_mask=None, labels=mb["labels"])

    def loss_func(output):
        loss = output.float().mean()
        # clone: Megatron divides the returned loss in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


@dataclass
class Built:
    """What a builder returns: the (unwrapped) model and its Megatron config, plus MoUE hooks."""

    model: torch.nn.Module
    config: TransformerConfig
    data: Data
    pipeline_shapes: object = None  # adjust_tensor_shapes_fn for the 1F1B schedule
    after_step: object = None  # called after each optimizer step (pool loads)


def megatron_builder(shape: TinyGPT):
    def build_fn(layout: ParallelLayout, seed: int) -> Built:
        config = transformer_config(shape, layout)
        model = GPTModel(
            config=config, transformer_layer_spec=gpt_block_spec(config, shape.num_experts),
            vocab_size=shape.vocab_size, max_sequence_length=shape.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
        )
        return Built(model, config, Data(shape.vocab_size, shape.seq_length,
                                         shape.global_batch_size, shape.micro_batch_size))
    return build_fn


def engine_settings(lr: float) -> TrainConfig:
    """The tests' optimizer: Adam at a constant ``lr`` (min_lr = lr, no warmup), weight decay
    0.01, clipping at 1.0, betas (0.9, 0.999)."""
    return TrainConfig(lr=lr, min_lr=lr, warmup_steps=0, steps=1000, weight_decay=0.01,
                       clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999)


def build(build_fn, layout: ParallelLayout, *, lr: float = 1e-2,
          distributed_optimizer: bool = True, seed: int = 7, fill=fill_by_global_key):
    """The model of ``build_fn`` on the Trainer's own engine (``moue.training.engine``)."""
    init_model_parallel(layout)
    seed_everything(seed)
    built = build_fn(layout, seed)
    built.model.to(_device())
    fill(built.model, seed)
    engine = build_engine(built.model, built.config, engine_settings(lr),
                          distributed_optimizer=distributed_optimizer)
    return engine, built


def train(build_fn, layout: ParallelLayout, steps: int = 3, **build_kwargs) -> dict:
    """Train ``steps`` steps; returns the loss history and the grad norm of every step."""
    engine, built = build(build_fn, layout, **build_kwargs)
    data = built.data
    pg = ProcessGroupCollection.use_mpu_process_groups()
    num_micro = data.global_batch_size // (data.micro_batch_size * pg.dp.size())
    losses, grad_norms, balance, ep_balance = [], [], [], []
    clear_aux_losses_tracker()
    for step in range(steps):
        step_losses = engine.forward_backward(
            _forward_step, _microbatches(data, step), num_microbatches=num_micro,
            seq_length=data.seq_length, micro_batch_size=data.micro_batch_size,
            adjust_tensor_shapes_fn=built.pipeline_shapes if layout.pp > 1 else None)
        ok, grad_norm, _ = engine.optimizer_step()
        if not ok:
            raise RuntimeError(f"optimizer step {step} was skipped")
        if built.after_step is not None:
            built.after_step()
        losses.append(step_mean(step_losses, "lm loss", _device(), pg))
        grad_norms.append(grad_norm)
        tracked = tracked_moe_values(num_micro, pg)
        balance.append(sum(tracked.get("balance_loss", [])))
        ep_balance.append(sum(tracked.get("ep_balance_loss", [])))
    engine.close()  # the model stays readable; the engine's groups are freed with it
    return {"losses": losses, "grad_norms": grad_norms, "balance_loss": balance,
            "ep_balance_loss": ep_balance, "model": engine.model}


LAYOUTS = {  # name -> (tp, pp, ep) on two processes; etp takes the layout's default
    "dp2": (1, 1, 1), "tp2_sp": (2, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1), "tp2_ep2": (2, 1, 2),
}


def layout_for(name: str, world_size: int) -> ParallelLayout:
    tp, pp, ep = LAYOUTS[name] if name != "single" else (1, 1, 1)
    return ParallelLayout(world_size=world_size, tp=tp, pp=pp, ep=ep)


