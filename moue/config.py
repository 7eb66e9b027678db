"""Run configuration: frozen sections loaded from YAML with dotted ``key=value`` overrides.

Every field is type-checked when a section is built (``moue.sections.Section``). Each section
then validates its own values (``UserError`` naming the field, the value and the fix);
``RunConfig`` checks the rules that span sections, and builds the run's topology once
(``RunConfig.topology``), which checks every rule of the pool's shape. The ``elastic`` section
belongs to ``moue.elastic``. Nothing here has side effects. Megatron's ``TransformerConfig`` is
built from these in ``moue.model.megatron_config``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from moue.elastic.config import Choices, ElasticConfig, resolve
from moue.model.balance import BALANCES
from moue.model.recompute import RECOMPUTE_MODULES, UNSAFE
from moue.model.topology import TOPOLOGIES, Topology, build_topology
from moue.sections import (
    ARCHITECTURE,
    MAY_CHANGE,
    Section,
    check,
    one_of,
    positive,
    reference,
    setting,
)
from parallel.capability import EXPERT_IMPLS, FP8_RECIPES, PRECISIONS, TRANSFORMER_IMPLS
from parallel.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    section = "model"
    num_layers: int = setting(4, "transformer layers", resume=ARCHITECTURE)
    hidden_size: int = setting(64, "must be a multiple of `num_attention_heads` unless "
                               "`head_dim` is set", resume=ARCHITECTURE)
    num_attention_heads: int = setting(4, "attention heads", resume=ARCHITECTURE)
    num_query_groups: int | None = setting(
        None, "grouped-query attention; null = as many as heads", resume=ARCHITECTURE)
    head_dim: int | None = setting(
        None, "channels per attention head (Megatron's `kv_channels`); null = `hidden_size / "
        "num_attention_heads`. Qwen3-MoE sets its own (e.g. 128 with hidden 2048 and 32 heads)",
        resume=ARCHITECTURE)
    seq_length: int = setting(128, "tokens per sample. May change on resume: RoPE has no "
                              "learned positions (`moue-eval --tokens` evaluates any length)",
                              resume=MAY_CHANGE)
    vocab_size: int = setting(256, "the embedding's rows; at least the tokenizer's vocabulary",
                              resume=ARCHITECTURE)
    ffn_hidden_size: int = setting(256, "hidden size of dense (non-MoE) layers' MLPs",
                                   resume=ARCHITECTURE)
    moe_layer_freq: int = setting(
        1, "layers 0, k, 2k, ... are MoE layers; the others are dense. `0`: no MoE layer at all "
        "- Megatron's dense GPT, the activated-parameter baseline of the benchmarks (the `moe` "
        "section is then ignored, and `parallel.ep` must be 1)", resume=ARCHITECTURE)
    normalization: str = setting("RMSNorm", "RMSNorm or LayerNorm", resume=ARCHITECTURE)
    activation: str = setting(
        "gelu", "`gelu` or `swiglu` (Megatron's gated linear unit with SiLU: `linear_fc1` holds "
        "gate and up, gate first) for experts, shared experts and dense layers",
        resume=ARCHITECTURE)
    transformer_impl: str = setting(
        "auto", "`local` (Megatron-Core's local layers), `transformer_engine` (Megatron-Core's "
        "TE spec: fused attention, fused norms, kernel fusions), `auto` (TE where it imports and "
        "there is a GPU). Chooses kernels, not weights ([gpu.md](gpu.md))", resume=MAY_CHANGE)
    # What released checkpoints use (docs/configuration.md, "Architecture options"):
    rope_base: float = setting(10000.0, "RoPE's base θ (Qwen3: 1000000)", resume=ARCHITECTURE)
    norm_epsilon: float = setting(1e-5, "epsilon of every norm (Mixtral: 1e-5, Qwen: 1e-6)",
                                  resume=ARCHITECTURE)
    qk_norm: bool = setting(
        False, "a norm (`normalization`) over each attention head's query and key before RoPE, "
        "one weight vector of the head dimension shared by all heads (Qwen3; Megatron's "
        "`qk_layernorm`)", resume=ARCHITECTURE)
    qkv_bias: bool = setting(False, "biases on the query/key/value projection only (Qwen2); "
                             "every other linear has none", resume=ARCHITECTURE)
    tie_embeddings: bool = setting(
        False, "the output layer reuses the input embedding (under pipeline parallelism Megatron "
        "keeps the two stages' copies equal: the same losses as one process)",
        resume=ARCHITECTURE)

    def _validate(self):
        positive("model", self, "num_layers", "hidden_size", "num_attention_heads",
                 "seq_length", "vocab_size", "ffn_hidden_size")
        check(self.rope_base > 1, "model.rope_base", self.rope_base,
              "must be > 1 (10000 in most models, 1000000 in Qwen3)")
        check(0 < self.norm_epsilon < 1, "model.norm_epsilon", self.norm_epsilon,
              "must lie in (0, 1), e.g. 1e-5 or 1e-6")
        check(self.moe_layer_freq >= 0, "model.moe_layer_freq", self.moe_layer_freq,
              "must be an integer >= 0 (0 builds the dense model, without MoE layers)")
        if self.num_query_groups is not None:
            positive("model", self, "num_query_groups")
            check(self.num_attention_heads % self.num_query_groups == 0,
                  "model.num_query_groups", self.num_query_groups,
                  f"must divide model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                  self.hidden_size, f"must be a multiple of model.num_attention_heads="
                  f"{self.num_attention_heads} (or set model.head_dim)")
        else:
            positive("model", self, "head_dim")
            check(self.head_dim % 2 == 0, "model.head_dim", self.head_dim,
                  "must be even (RoPE rotates pairs of channels)")
        one_of("model.normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        one_of("model.activation", self.activation, ("gelu", "swiglu"))
        one_of("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)

    @property
    def kv_channels(self) -> int:
        """Channels per attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def dense(self) -> bool:
        """No MoE layers: the dense baseline (every MLP has ``ffn_hidden_size``)."""
        return self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE layers."""
        return [] if self.dense else [i for i in range(self.num_layers) if i % self.moe_layer_freq == 0]


@dataclass(frozen=True, kw_only=True)
class MoEConfig(Section):
    section = "moe"
    num_experts: int = setting(16, "`E`, the size of the pool", resume=ARCHITECTURE)
    expert_ffn_hidden_size: int = setting(64, "hidden size of each expert", resume=ARCHITECTURE)
    topk: int = setting(2, "experts per token; at most the window (see the note on top-1 below)",
                        resume=ARCHITECTURE)
    topology: str = setting("rotational", "`standard`, `rotational`, `full`, `explicit` "
                            "([concepts](concepts.md))", resume=ARCHITECTURE)
    window: int = setting(8, "`w` of the rotational topology; at most `num_experts`",
                          resume=ARCHITECTURE)
    stride: int = setting(4, "`s` of the rotational topology", resume=ARCHITECTURE)
    shared_experts: int = setting(0, "always-on experts, each of `expert_ffn_hidden_size`",
                                  resume=ARCHITECTURE)
    shared_expert_gate: bool = setting(
        False, "the shared experts' output times `sigmoid(x·g)`, one learned vector `g` of the "
        "hidden size per layer (Qwen2-MoE); needs `shared_experts > 0`", resume=ARCHITECTURE)
    router_state_dim: int = setting(64, "`d_r`, the trajectory state; 0 turns it off",
                                    resume=ARCHITECTURE)
    score_function: str = setting("softmax", "softmax or sigmoid", resume=ARCHITECTURE)
    pre_softmax: bool = setting(
        False, "softmax over all window logits, then top-k, gates not renormalised (Megatron's "
        "`moe_router_pre_softmax`; Hugging Face `norm_topk_prob: false`: Qwen2-MoE, OLMoE). "
        "`false`: top-k logits, then softmax over them, which equals softmax then top-k "
        "renormalised to sum 1 (`norm_topk_prob: true`; Mixtral, Qwen3-MoE)",
        resume=ARCHITECTURE)
    balance: str = setting("uelb", "`uelb`, `per_layer`, `aux_free`, `none`", resume=MAY_CHANGE)
    balance_coeff: float = setting(1e-2, "coefficient of the balance loss", resume=MAY_CHANGE)
    aux_free_rate: float = setting(1e-3, "per-step bias update of `aux_free`", resume=MAY_CHANGE)
    z_loss_coeff: float = setting(0.0, "router z-loss", resume=MAY_CHANGE)
    dispatcher: str = setting("alltoall", "Megatron's token dispatcher: alltoall or allgather",
                              resume=MAY_CHANGE)
    ep_balance_coeff: float = setting(
        0.0, "coefficient of the per-layer balance over expert-parallel ranks "
        "([concepts](concepts.md#balance-over-expert-parallel-ranks)); 0: off", resume=MAY_CHANGE)
    ep_balance_groups: int = setting(
        0, "the number of rank groups that term balances (pool expert `e` in group `e mod G`); "
        "0: `parallel.ep`. Set it to the EP degree of the production run: the loss is then the "
        "same under every layout", resume=MAY_CHANGE)
    ep_balance_rate: float = setting(
        0.0, "per-step move of a selection bias per MoE layer and rank group toward even "
        "tokens per group ([concepts](concepts.md#balance-over-expert-parallel-ranks)); 0: "
        "off", resume=MAY_CHANGE)
    eligibility: list[list[int]] | None = setting(
        None, "with `topology: explicit` only: one list of pool ids per MoE layer, all of the "
        "same length (what `moue-export` writes for a sub-model)", resume=ARCHITECTURE)
    expert_impl: str = setting(
        "auto", "the pool: `sequential` (Megatron's `SequentialMLP`), `grouped` (Megatron's "
        "`TEGroupedMLP`: one grouped GEMM per linear; TE's on the TE spec, torch's elsewhere), "
        "`auto` (grouped with the TE spec). Checkpoints load into either "
        "([gpu.md](gpu.md#the-grouped-gemm-pool))", resume=MAY_CHANGE)
    # Progressive widening (moue-convert widen, docs/conversion.md): layer l's own experts are
    # [l*widen_block, (l+1)*widen_block); the rest of its window opens over widen_steps steps.
    widen_block: int = setting(
        0, "progressive widening ([conversion.md](conversion.md#progressive-widening)): layer "
        "`l` owns pool experts `[l*widen_block, (l+1)*widen_block)`; the rest of its window "
        "opens over `widen_steps`. Needs `topology: rotational`, `stride = widen_block`, "
        "`window >= widen_block`, `num_experts = widen_block x MoE layers`. `moue-convert "
        "widen` writes it; 0: off", resume=MAY_CHANGE)
    widen_steps: int = setting(
        0, "steps over which the foreign experts open: their softmax scores (and the "
        "trajectory-state term) are scaled by `t / widen_steps` after `t` steps",
        resume=MAY_CHANGE)

    def _validate(self):
        positive("moe", self, "num_experts", "expert_ffn_hidden_size", "topk", "window",
                 "stride")
        for n in ("shared_experts", "router_state_dim"):
            v = getattr(self, n)
            check(v >= 0, f"moe.{n}", v, "must be an integer >= 0")
        one_of("moe.topology", self.topology, sorted(TOPOLOGIES))
        one_of("moe.balance", self.balance, sorted(BALANCES))
        one_of("moe.score_function", self.score_function, ("softmax", "sigmoid"))
        one_of("moe.dispatcher", self.dispatcher, ("alltoall", "allgather"))
        one_of("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)
        check(self.ep_balance_groups >= 0, "moe.ep_balance_groups", self.ep_balance_groups,
              "must be an integer >= 0 (0: parallel.ep)")
        for n in ("balance_coeff", "aux_free_rate", "z_loss_coeff", "ep_balance_coeff",
                  "ep_balance_rate"):
            check(getattr(self, n) >= 0, f"moe.{n}", getattr(self, n), "must be >= 0")
        check(self.shared_experts > 0 or not self.shared_expert_gate, "moe.shared_expert_gate",
              self.shared_expert_gate, "gates the shared experts: set moe.shared_experts > 0, "
              "or leave the gate off")
        for n in ("widen_block", "widen_steps"):
            check(getattr(self, n) >= 0, f"moe.{n}", getattr(self, n), "must be an integer >= 0")
        if self.widen_block:
            check(self.topology == "rotational" and self.stride == self.widen_block
                  and self.window >= self.widen_block, "moe.widen_block", self.widen_block,
                  "widens a standard model into moe.topology=rotational with moe.stride = "
                  "widen_block (each layer's window starts at its own block) and moe.window >= "
                  "widen_block; moue-convert widen writes such a config")
            check(self.widen_steps >= 1, "moe.widen_steps", self.widen_steps,
                  "must be >= 1 (the steps over which the new experts open) with moe.widen_block")
        check((self.eligibility is not None) == (self.topology == "explicit"), "moe.eligibility",
              self.eligibility, "is set with moe.topology=explicit (one list of pool ids per MoE "
              "layer) and only then")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(Section):
    section = "parallel"
    tp: int = setting(1, "tensor-parallel degree")
    pp: int = setting(1, "pipeline-parallel degree")
    ep: int = setting(1, "expert-parallel degree (the pool's experts split over `ep` ranks)")
    etp: int | None = setting(None, "expert tensor-parallel degree; null: `tp` when `ep == 1`, "
                              "else 1 ([parallel.md](parallel.md))")

    def _validate(self):
        positive("parallel", self, "tp", "pp", "ep")
        if self.etp is not None:
            positive("parallel", self, "etp")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    section = "train"
    micro_batch_size: int = setting(2, "samples per micro-batch on each data-parallel rank")
    global_batch_size: int = setting(8, "samples per optimizer step; a multiple of "
                                     "`micro_batch_size`")
    steps: int = setting(100, "optimizer steps")
    lr: float = setting(3e-3, "peak learning rate")
    min_lr: float = setting(3e-4, "the schedule's final learning rate; `0 <= min_lr <= lr`")
    warmup_steps: int = setting(10, "linear warmup; below `steps`")
    schedule: str = setting("cosine", "cosine or wsd")
    weight_decay: float = setting(0.1, "Adam's decoupled weight decay")
    clip_grad: float = setting(1.0, "gradient-norm clipping; 0: off")
    adam_beta1: float = setting(0.9, "Adam's first beta")
    adam_beta2: float = setting(0.95, "Adam's second beta")
    seed: int = setting(1234, "the initial weights (the same under every layout, "
                        "`moue/model/init.py`) and, unless `data.seed` is set, the sample order")
    precision: str = setting(
        "auto", "auto (bf16 on GPUs, fp32 on CPUs), fp32, bf16, fp8 (bf16 weights, Transformer "
        "Engine FP8 GEMMs; a GPU with TE)")
    fp8_recipe: str = setting(
        "tensorwise", "with `precision: fp8`: `tensorwise` (8.9+), `blockwise` (Hopper), "
        "`mxfp8` (Blackwell); `delayed` is refused for MoE models ([gpu.md](gpu.md#precision))")
    grad_accum_fusion: bool | None = setting(
        None, "weight gradients written into Megatron's `main_grad` inside the GEMMs; null: on "
        "where Transformer Engine's layers and apex's kernel are (the GPU image), `false` turns "
        "it off; `true` on a CPU runs the stand-ins of both libraries, for tests "
        "([gpu.md](gpu.md#state-a-module-keeps-between-calls-the-shared-pool))")
    recompute: str = setting("none", "activation recomputation: `none`, `selective`, `full` "
                             "(each layer recomputed from its input in backward)")
    recompute_modules: list[str] | None = setting(
        None, "with `recompute: selective`: Megatron's modules `core_attn` (the default), "
        "`layernorm`, `mlp`, `shared_experts`; `moe` and `moe_act` are refused (the shared pool "
        "and the router's state, [gpu.md](gpu.md#recompute))")
    eval_interval: int = setting(50, "steps between evaluations; 0 turns evaluation off")
    eval_iters: int = setting(4, "global batches of the validation split per evaluation; at "
                              "least 1 while `eval_interval > 0`")
    on_nan: str = setting("stop", "stop or skip: what a NaN/Inf loss does (skip: no update, the "
                          "data moves on)")

    def _validate(self):
        positive("train", self, "micro_batch_size", "global_batch_size", "steps")
        one_of("train.on_nan", self.on_nan, ("stop", "skip"))
        check(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
              self.global_batch_size,
              f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        check(0 <= self.warmup_steps < self.steps, "train.warmup_steps", self.warmup_steps,
              f"must be a whole number below train.steps={self.steps}")
        one_of("train.schedule", self.schedule, ("cosine", "wsd"))
        one_of("train.precision", self.precision, PRECISIONS)
        one_of("train.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        one_of("train.recompute", self.recompute, ("none", "selective", "full"))
        if self.recompute_modules is not None:
            check(self.recompute == "selective", "train.recompute_modules",
                  self.recompute_modules, "is read with train.recompute=selective only")
            for name in self.recompute_modules:
                check(name not in UNSAFE, "train.recompute_modules", name,
                      UNSAFE.get(name, ""))
                one_of("train.recompute_modules", name, RECOMPUTE_MODULES)
        check(self.lr > 0, "train.lr", self.lr, "must be a positive learning rate, e.g. 3e-4")
        check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr,
              f"must be between 0 and train.lr={self.lr} (the schedule decays from lr to min_lr)")
        for n in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, n) < 1, f"train.{n}", getattr(self, n),
                  "must be in [0, 1), e.g. 0.9 and 0.95")
        for n in ("weight_decay", "clip_grad"):
            check(getattr(self, n) >= 0, f"train.{n}", getattr(self, n), "must be >= 0 (0: off)")
        check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval,
              "must be an integer >= 0 (0 turns evaluation off)")
        check(self.eval_iters >= 1 or self.eval_interval == 0, "train.eval_iters",
              self.eval_iters, "must be at least 1 batch while train.eval_interval > 0 "
              "(set train.eval_interval=0 to turn evaluation off)")
        check(self.seed >= 0, "train.seed", self.seed, "must be an integer >= 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    section = "data"
    path: str | None = setting(None, "prefix of a Megatron indexed dataset (`.bin/.idx`)")
    blend: list[float | str] | None = setting(
        None, "`[weight, prefix, weight, prefix, ...]` (or `[prefix]`)")
    split: str = setting("98,2,0", "train/valid/test weights (three non-negative numbers, "
                         "train > 0)")
    tokenizer: str = setting("byte", "`byte`, or a tokenizer file (`tokenizer.json`, "
                             "SentencePiece `.model`)")
    mock: bool | None = setting(
        None, "synthetic tokens from Megatron's `MockGPTDataset` (`data_tools/megatron_data.py`),"
        " no files; null: true when neither `path` nor `blend` is given")
    seed: int | None = setting(
        None, "seed of the order of the train and validation samples; null: `train.seed`, as "
        "Megatron-LM's one `--seed`. Set it to compare initialisations on the same data order "
        "and the same held-out samples (`benchmarks/quality.py` does)")
    start_sample: int = setting(
        0, "the first global sample of the train split that step 1 reads (step k reads "
        "`[start_sample + (k-1)*G, start_sample + k*G)`, G the global batch): a run continuing "
        "a trained model reads what its base has not seen. `moue-convert widen` and "
        "`moue-export` write the base's own end of data ([conversion](conversion.md))")
    num_workers: int | None = setting(
        None, "processes that assemble the next training micro-batches while a step runs; "
        "null: 2 on a GPU, 0 on a CPU, where they would take the cores the step needs "
        "([gpu.md](gpu.md#the-step-loop))")

    @property
    def valid_share(self) -> float:
        """The validation split's weight in ``split`` (0: no validation split)."""
        return float(self.split.replace("/", ",").split(",")[1])

    def _validate(self):
        if self.mock is None:
            object.__setattr__(self, "mock", not (self.path or self.blend))
        check(self.start_sample >= 0, "data.start_sample", self.start_sample,
              "must be an integer >= 0 (0: the train split from its start)")
        check(self.num_workers is None or self.num_workers >= 0, "data.num_workers",
              self.num_workers, "must be an integer >= 0, or null (2 on a GPU, 0 on a CPU)")
        check(self.mock or self.path or self.blend, "data.path", self.path,
              "set data.path (or data.blend) to a preprocessed dataset, or data.mock=true "
              "for synthetic tokens")
        parts = self.split.replace("/", ",").split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        check(len(shares) == 3 and min(shares) >= 0 and shares[0] > 0, "data.split", self.split,
              "must be three non-negative weights train,valid,test with train > 0, e.g. 98,2,0")
        if self.blend is not None and len(self.blend) == 1:  # one dataset: [prefix]
            check(isinstance(self.blend[0], str), "data.blend", self.blend,
                  "must be [prefix] or [weight, prefix, weight, prefix, ...]")
        elif self.blend is not None:
            check(len(self.blend) >= 2 and len(self.blend) % 2 == 0, "data.blend", self.blend,
                  "must be a list [weight, prefix, weight, prefix, ...] (or [prefix])")
            for weight, prefix in zip(self.blend[::2], self.blend[1::2], strict=True):
                check(isinstance(weight, (int, float)) and not isinstance(weight, bool)
                      and weight > 0 and isinstance(prefix, str), "data.blend", self.blend,
                      "must alternate positive weights and dataset prefixes, e.g. "
                      "[0.7, data/web, 0.3, data/code]")
        check(self.seed is None or self.seed >= 0, "data.seed", self.seed,
              "must be an integer >= 0, or null for train.seed")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(Section):
    section = "checkpoint"
    dir: str | None = setting(None, "where checkpoints go; null: none")
    interval: int = setting(0, "steps between checkpoints; 0: only at the end and on "
                            "SIGTERM/SIGINT")
    keep_last: int = setting(2, "checkpoints kept (see "
                             "[training.md](training.md#checkpoints-checkpointdir---mouetrainingcheckpointpy))")
    init: str | None = setting(
        None, "a checkpoint (a `checkpoint.dir` or one `step_N`; a training or a model-only "
        "one) whose weights start this run at step 0 when `checkpoint.dir` has none yet; "
        "ignored once it has ([training.md](training.md#starting-from-another-runs-weights-checkpointinit))")
    init_optimizer: bool = setting(
        False, "with `init` a training checkpoint: take its Adam state too (moments and step "
        "count); the schedule, the step and the data position start anew")

    def _validate(self):
        check(self.interval >= 0, "checkpoint.interval",
              self.interval, "must be an integer >= 0 (0 turns periodic checkpoints off)")
        positive("checkpoint", self, "keep_last")
        check(bool(self.init) or not self.init_optimizer, "checkpoint.init_optimizer",
              self.init_optimizer, "takes the optimizer state of checkpoint.init: set "
              "checkpoint.init too, or leave init_optimizer false")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    section = "logging"
    dir: str = setting("runs/latest", "TensorBoard events, `metrics.jsonl`, plots")
    interval: int = setting(1, "steps between logged lines")
    metrics_file: str | None = setting(None, "one JSON line per logged step; null: "
                                       "`<dir>/metrics.jsonl`")
    ep_balance_ranks: int = setting(0, "the EP degree of the `ep_load_max_over_mean` figure; "
                                    "0: `parallel.ep`")

    def _validate(self):
        positive("logging", self, "interval")
        check(self.ep_balance_ranks >= 0, "logging.ep_balance_ranks", self.ep_balance_ranks,
              "must be an integer >= 0 (0: the run's parallel.ep)")


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
            "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
            "logging": LoggingConfig, "elastic": ElasticConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            check(isinstance(getattr(self, name), cls), name, getattr(self, name),
                  f"must be a {cls.__name__}")
        check(self.data.valid_share > 0 or not self.train.eval_interval, "data.split", self.data.split,
              f"leaves no validation split, which train.eval_interval="
              f"{self.train.eval_interval} evaluates on: give it a share (e.g. 98,2,0) or set "
              "train.eval_interval=0")
        topology = choices = None
        if self.model.dense:  # the moe section is not used
            check(self.parallel.ep == 1, "parallel.ep", self.parallel.ep,
                  "the dense model (model.moe_layer_freq=0) has no experts to split; "
                  "use parallel.ep=1 (its ranks then do data parallelism)")
            check(not self.elastic.enabled, "elastic.enabled", True,
                  "elastic training needs MoE layers; the dense model (model.moe_layer_freq=0) "
                  "has none")
        else:  # built once per run; checks every rule of the pool's shape
            moe = self.moe
            groups = moe.ep_balance_groups
            check(not moe.widen_block
                  or moe.num_experts == moe.widen_block * len(self.model.moe_layers),
                  "moe.widen_block", moe.widen_block, f"times the {len(self.model.moe_layers)} "
                  f"MoE layers must equal moe.num_experts={moe.num_experts} (every layer owns "
                  "one block of the pool)")
            check(not groups or moe.num_experts % groups == 0, "moe.ep_balance_groups", groups,
                  f"must divide moe.num_experts={moe.num_experts} (or 0 for parallel.ep)")
            ranks = self.logging.ep_balance_ranks
            check(not ranks or moe.num_experts % ranks == 0, "logging.ep_balance_ranks", ranks,
                  f"must divide moe.num_experts={moe.num_experts} (or 0 for parallel.ep)")
            topology = build_topology(moe.topology, num_layers=len(self.model.moe_layers),
                                      num_experts=moe.num_experts, topk=moe.topk,
                                      window=moe.window, stride=moe.stride,
                                      eligibility=moe.eligibility)
            choices = resolve(self.elastic, num_layers=self.model.num_layers,
                              num_experts=moe.num_experts, topk=moe.topk,
                              window=topology.window, block_size=topology.block_size(moe.stride))
        object.__setattr__(self, "_topology", topology)  # not fields: asdict/eq ignore them
        object.__setattr__(self, "_elastic_choices", choices)

    @property
    def data_seed(self) -> int:
        """Seed of the sample order: ``data.seed``, else ``train.seed`` (Megatron-LM's one seed)."""
        return self.train.seed if self.data.seed is None else self.data.seed

    def topology(self) -> Topology | None:
        """The eligibility topology of the MoE layers (built once); None for the dense model."""
        return self._topology

    def elastic_choices(self) -> Choices | None:
        """The elastic axes' resolved choices (``moue.elastic.config``); None for the dense model."""
        return self._elastic_choices

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that decide what the weights are and mean (declared ``ARCHITECTURE`` at
        the field): a checkpoint loads only into a run with the same ones. The rest (balance,
        dispatcher, kernels, every other section) may change when a run resumes."""
        return {name: {f.name: getattr(getattr(self, name), f.name)
                       for f in fields(SECTIONS[name]) if f.metadata["resume"] == ARCHITECTURE}
                for name in ARCHITECTURE_SECTIONS}


ARCHITECTURE_SECTIONS = ("model", "moe")  # their fields declare whether they may change on resume


def may_change_on_resume() -> list[str]:
    """``section.key`` of the model and moe fields a resumed run may set otherwise."""
    return [f"{name}.{f.name}" for name in ARCHITECTURE_SECTIONS
            for f in fields(SECTIONS[name]) if f.metadata["resume"] == MAY_CHANGE]


def _nearest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(prefix + c for c in close)}?"
    return f"; valid: {', '.join(prefix + v for v in valid)}"


def _set_dotted(tree: dict, dotted: str, value):
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise UserError(f"unknown config section {section!r} in {dotted!r}"
                        f"{_nearest(section, SECTIONS)}")
    if not key or "." in key:
        raise UserError(f"override {dotted!r}: use section.key=value, e.g. moe.window=8")
    tree.setdefault(section, {})[key] = value


def _build_section(name: str, values: dict):
    cls = SECTIONS[name]
    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise UserError(f"unknown key {name}.{key}{_nearest(str(key), names, f'{name}.')}")
    return cls(**values)


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}; fix the syntax (a mapping of "
                        "sections, e.g. 'moe:' then indented 'window: 8')") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> RunConfig:
    """Load a YAML config and apply ``section.key=value`` overrides (values parsed as YAML).
    ``base`` (instead of ``path``): a config as ``RunConfig.to_dict`` wrote it (a checkpoint's)."""
    tree: dict = {k: dict(v) for k, v in (base or {}).items() if k in SECTIONS}
    if path is not None:
        try:
            text = Path(path).read_text()
        except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
            raise UserError(f"--config {path}: cannot read it ({type(err).__name__}); give the "
                            "path of a YAML config, e.g. examples/configs/tiny_cpu.yaml") from None
        tree = _parse_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise UserError(f"{path}: a config file is a mapping of sections (model:, moe:, ...)")
        for section, values in tree.items():
            if section not in SECTIONS:
                raise UserError(f"{path}: unknown section {section!r}"
                                f"{_nearest(str(section), SECTIONS)}")
            if values is None:
                tree[section] = {}
            elif not isinstance(values, dict):
                raise UserError(f"{path}: section {section!r} must be a mapping of keys")
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"override {item!r}: use section.key=value, e.g. moe.window=8")
        _set_dotted(tree, dotted.strip(), _parse_yaml(raw, f"override {item!r}"))
    sections = {name: _build_section(name, values) for name, values in tree.items()}
    return RunConfig(**sections)


# --- the configuration reference in docs/configuration.md, generated from the fields ---

REFERENCE_START, REFERENCE_END = "<!-- generated from moue/config.py: {} -->", "<!-- end -->"


def with_reference(text: str) -> str:
    """``text`` (docs/configuration.md) with each section's generated table between its
    markers (``python -m moue.config`` rewrites the file)."""
    for name, cls in SECTIONS.items():
        start = REFERENCE_START.format(name)
        if start not in text:
            raise ValueError(f"docs/configuration.md has no {start!r} marker for the {name} "
                             "section")
        before, _, rest = text.partition(start)
        _, _, after = rest.partition(REFERENCE_END)
        table = reference(cls, with_resume=name in ARCHITECTURE_SECTIONS)
        text = f"{before}{start}\n{table}\n{REFERENCE_END}{after}"
    return text


if __name__ == "__main__":
    docs = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    docs.write_text(with_reference(docs.read_text()))
