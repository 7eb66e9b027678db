"""The equivalence tests' runs: the product's Trainer on random tokens.

``train(cfg, layout)`` builds a ``moue.training.trainer.Trainer`` for ``cfg`` (its model chunk
from ``moue.model.chunk``, initialised from global keys; its engine: Megatron DDP, the distributed
optimizer, the schedules) and steps it with ``Trainer.train_step``, what ``moue-pretrain`` runs.
Only the data is the harness's (``RandomTokens``: the same global batch of step k under every
layout). ``MegatronMoE`` trains Megatron-Core's own GPT with MoE on the same Trainer
(``moue.model.builder.build_megatron_moe``: no MoUE module), so that a difference between layouts
is a fault of the parallel stack or of the CPU backend.

``fill_by_global_key`` gives two *different* models the same weights where their checkpoint
keys differ (Megatron's per-layer experts and the MoUE pool), which the product's
initialisation cannot.
"""

from __future__ import annotations

import zlib

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from moue.config import RunConfig, load_config
from moue.model.builder import build_megatron_moe
from moue.model.chunk import build_chunk
from moue.model.init import sharded_parameters
from moue.run_check import plan_run
from moue.training.metrics import step_figures
from moue.training.trainer import Trainer
from parallel.launch import init_model_parallel, seed_everything
from parallel.layout import ParallelLayout

# A small rotational MoUE: 4 layers sharing a pool of 8 experts, windows of 4 with stride 2
# (adjacent layers share 2 experts; under pp=2 the windows cross the stage boundary). The
# optimizer: Adam at a constant lr (min_lr = lr, no warmup), weight decay 0.01, clipping at 1.0.
TINY = ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128",
        "moe.num_experts=8", "moe.expert_ffn_hidden_size=32", "moe.topk=2",
        "moe.topology=rotational", "moe.window=4", "moe.stride=2", "moe.router_state_dim=8",
        "moe.balance=uelb", "moe.balance_coeff=0.01",
        "train.global_batch_size=4", "train.micro_batch_size=1", "train.lr=1e-2",
        "train.min_lr=1e-2", "train.warmup_steps=0", "train.weight_decay=0.01",
        "train.clip_grad=1.0", "train.adam_beta1=0.9", "train.adam_beta2=0.999", "train.seed=7",
        "train.eval_interval=0"]

# Megatron's own MoE (MegatronMoE) and moue's standard topology of the same shape: 4 private
# experts per layer (a pool of 16), top-2, Switch aux loss 0.01 per layer, no trajectory state.
STANDARD = ("moe.topology=standard", "moe.num_experts=16", "moe.expert_ffn_hidden_size=64",
            "moe.router_state_dim=0", "moe.balance=per_layer", "moe.balance_coeff=0.04")


def tiny(*overrides: str) -> RunConfig:
    return load_config(None, [*TINY, *overrides])


def random_batch(cfg: RunConfig, step: int) -> torch.Tensor:
    """The global batch of a step: [global_batch_size, seq_length + 1] token ids."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, cfg.model.vocab_size,
                         (cfg.train.global_batch_size, cfg.model.seq_length + 1), generator=g)


class RandomTokens(torch.utils.data.Dataset):
    """Sample ``i`` is row ``i % G`` of ``random_batch(i // G)``, as the Trainer reads it."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.global_batch = cfg, cfg.train.global_batch_size

    def __len__(self) -> int:
        return self.cfg.train.steps * self.global_batch

    def __getitem__(self, i: int) -> dict:
        row = random_batch(self.cfg, i // self.global_batch)[i % self.global_batch]
        seq = self.cfg.model.seq_length
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(seq),
                "position_ids": torch.arange(seq)}


class OnRandomTokens(Trainer):
    """The Trainer, training on ``RandomTokens`` (no validation split)."""

    def build_datasets(self) -> tuple:
        return RandomTokens(self.cfg), None


class MegatronMoE(OnRandomTokens):
    """Megatron-Core's own GPT with MoE on the Trainer."""

    def build_module(self, megatron_config) -> torch.nn.Module:
        cfg = self.cfg
        return build_megatron_moe(cfg.model, cfg.moe, megatron_config, self.pg, self.plan)


def _device() -> torch.device:
    """cuda when the run communicates over nccl (a GPU run), else cpu."""
    return torch.device("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")


def train(cfg: RunConfig, layout: ParallelLayout, steps: int = 3,
          trainer: type[Trainer] = OnRandomTokens) -> dict:
    """``steps`` optimizer steps of ``trainer`` (train.steps = ``steps``: the LR schedule's end);
    per step the loss, the grad norm, the balance and EP-balance losses, and the model."""
    cfg = load_config(None, [f"train.steps={steps}"], base=cfg.to_dict())
    init_model_parallel(layout)
    seed_everything(cfg.train.seed)
    runs = {"losses": [], "grad_norms": [], "balance_loss": [], "ep_balance_loss": []}
    with trainer(cfg, layout, _device()) as t:
        for _ in range(steps):
            raw = t.train_step()
            if raw["skipped"]:
                raise RuntimeError(f"optimizer step {raw['step']} was skipped")
            m = step_figures(raw, t.num_microbatches, t.pg, moe_layers=t.moe_layers,
                             ep_ranks=t.ep_ranks)
            runs["losses"].append(m["loss"])
            runs["grad_norms"].append(m["grad_norm"])
            runs["balance_loss"].append(m["balance_loss"])
            runs["ep_balance_loss"].append(m.get("ep_balance_loss", 0.0))
    return {**runs, "model": t.model}  # closed: the model stays readable


def build(cfg: RunConfig, layout: ParallelLayout, megatron: bool = False) -> torch.nn.Module:
    """``cfg``'s model chunk alone (``moue.model.chunk``), initialised from global keys;
    ``megatron``: Megatron's own MoE for ``cfg`` instead (what ``MegatronMoE`` trains)."""
    init_model_parallel(layout)
    seed_everything(cfg.train.seed)
    pg, plan = ProcessGroupCollection.use_mpu_process_groups(), plan_run(cfg)
    megatron_moe = lambda config: build_megatron_moe(cfg.model, cfg.moe, config, pg, plan)  # noqa: E731
    return build_chunk(cfg.model, cfg.moe, cfg.train, cfg.topology(), layout, plan, _device(),
                       pg, build=megatron_moe if megatron else None)


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


LAYOUTS = {  # name -> (tp, pp, ep) on two processes; etp takes the layout's default
    "dp2": (1, 1, 1), "tp2_sp": (2, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1), "tp2_ep2": (2, 1, 2),
}


def layout_for(name: str, world_size: int) -> ParallelLayout:
    tp, pp, ep = LAYOUTS[name] if name != "single" else (1, 1, 1)
    return ParallelLayout(world_size=world_size, tp=tp, pp=pp, ep=ep)
