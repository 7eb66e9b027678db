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
from moue.model.topology import TOPOLOGIES, Topology, build_topology
from moue.sections import Section, check, one_of, positive
from parallel.capability import EXPERT_IMPLS, FP8_RECIPES, PRECISIONS, TRANSFORMER_IMPLS
from parallel.errors import UserError

# Megatron's selective-recompute modules moue allows, and those it refuses with the reason.
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "shared_experts")
UNSAFE_RECOMPUTE = {
    "moe": "recomputes whole MoE layers (Megatron's 'moe'), router included: the router's "
           "trajectory state and the pool's load counts are side effects of its forward, and a "
           "second forward under recompute would update them twice; use train.recompute=full "
           "(built for this) or leave 'moe' out",
    "moe_act": "keeps its recompute checkpoint on the expert module, and the pool is one module "
               "serving every MoE layer: each layer would overwrite the previous layer's before "
               "its backward; leave 'moe_act' out (or use train.recompute=full)",
    "mla_up_proj": "needs multi-latent attention, which moue models do not have",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    section = "model"
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: as many as attention heads (no GQA)
    head_dim: int | None = None  # None: hidden_size / num_attention_heads (Qwen3 sets its own)
    seq_length: int = 128
    vocab_size: int = 256
    ffn_hidden_size: int = 256  # dense (non-MoE) layers
    moe_layer_freq: int = 1  # every k-th layer (0, k, 2k, ...) is MoE; 0: dense, no MoE layers
    normalization: str = "RMSNorm"
    activation: str = "gelu"  # gelu | swiglu (gated: linear_fc1 holds gate and up, gate first)
    transformer_impl: str = "auto"  # auto | local | transformer_engine (parallel.capability)
    # What released checkpoints use (docs/configuration.md, "Architecture options"):
    rope_base: float = 10000.0  # RoPE's base (theta)
    norm_epsilon: float = 1e-5  # every norm's epsilon
    qk_norm: bool = False  # a norm over each head's query and key (model.normalization)
    qkv_bias: bool = False  # biases on the query/key/value projection
    tie_embeddings: bool = False  # the output layer reuses the input embedding

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
    num_experts: int = 16  # E: the size of the pool
    expert_ffn_hidden_size: int = 64
    topk: int = 2
    topology: str = "rotational"  # standard | rotational | full | explicit
    window: int = 8  # w (rotational)
    stride: int = 4  # s (rotational)
    shared_experts: int = 0  # always-on experts, each of expert_ffn_hidden_size
    shared_expert_gate: bool = False  # shared experts' output x sigmoid(x . g) (Qwen2-MoE)
    router_state_dim: int = 64  # d_r; 0 turns the trajectory state off
    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False
    balance: str = "uelb"  # uelb | per_layer | aux_free | none
    balance_coeff: float = 1e-2
    aux_free_rate: float = 1e-3  # per-step bias update of the aux_free balance
    z_loss_coeff: float = 0.0
    dispatcher: str = "alltoall"  # alltoall | allgather
    ep_balance_coeff: float = 0.0  # per-layer balance over EP-rank groups (moue.model.balance)
    ep_balance_groups: int = 0  # groups (pool expert e in group e mod G); 0: parallel.ep
    eligibility: list | None = None  # explicit topology: each MoE layer's pool ids
    expert_impl: str = "auto"  # auto | sequential | grouped (parallel.capability)
    # Progressive widening (moue-convert widen, docs/conversion.md): layer l's own experts are
    # [l*widen_block, (l+1)*widen_block); the rest of its window opens over widen_steps steps.
    widen_block: int = 0  # 0: no widening
    widen_steps: int = 0

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
        for n in ("balance_coeff", "aux_free_rate", "z_loss_coeff", "ep_balance_coeff"):
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
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: tp when ep == 1, else 1 (see parallel.layout)

    def _validate(self):
        positive("parallel", self, "tp", "pp", "ep")
        if self.etp is not None:
            positive("parallel", self, "etp")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    section = "train"
    micro_batch_size: int = 2
    global_batch_size: int = 8
    steps: int = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | wsd
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16 | fp8
    fp8_recipe: str = "tensorwise"  # tensorwise | blockwise (Hopper) | mxfp8 (Blackwell) | delayed
    # Weight gradients accumulated into Megatron's main_grad inside the GEMM. null: on where the
    # GPU kernels are (Transformer Engine + apex); true on a CPU runs their stand-ins (tests).
    grad_accum_fusion: bool | None = None
    recompute: str = "none"  # none | selective | full (activation recomputation)
    recompute_modules: list | None = None  # selective: Megatron's module names; None: core_attn
    eval_interval: int = 50
    eval_iters: int = 4
    on_nan: str = "stop"  # stop | skip: what a NaN/Inf loss does (skip: no update, data moves on)

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
                check(name not in UNSAFE_RECOMPUTE, "train.recompute_modules", name,
                      UNSAFE_RECOMPUTE.get(name, ""))
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
    path: str | None = None  # prefix of a Megatron indexed dataset (.bin/.idx)
    blend: list | None = None  # [weight, prefix, weight, prefix, ...]
    split: str = "98,2,0"
    tokenizer: str = "byte"
    mock: bool = False  # synthetic tokens (Megatron's mock dataset): no files needed
    seed: int | None = None  # order of the train and validation samples; None: train.seed
    # Processes that assemble the next training micro-batches while a step runs; None: 2 on a
    # GPU, 0 on a CPU (where they would take the cores the step needs).
    num_workers: int | None = None

    @property
    def valid_share(self) -> float:
        """The validation split's weight in ``split`` (0: no validation split)."""
        return float(self.split.replace("/", ",").split(",")[1])

    def _validate(self):
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
    dir: str | None = None  # None: no checkpoints
    interval: int = 0  # steps between checkpoints; 0 turns periodic checkpoints off
    keep_last: int = 2

    def _validate(self):
        check(self.interval >= 0, "checkpoint.interval",
              self.interval, "must be an integer >= 0 (0 turns periodic checkpoints off)")
        positive("checkpoint", self, "keep_last")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    section = "logging"
    dir: str = "runs/latest"  # TensorBoard events and plots
    interval: int = 1  # steps between logged lines
    metrics_file: str | None = None  # one JSON line per logged step; None: <dir>/metrics.jsonl
    ep_balance_ranks: int = 0  # EP degree of the tokens-per-EP-rank figure; 0: the run's own

    def _validate(self):
        positive("logging", self, "interval")
        check(self.ep_balance_ranks >= 0, "logging.ep_balance_ranks", self.ep_balance_ranks,
              "must be an integer >= 0 (0: the run's parallel.ep)")


# moe fields that steer training but do not change what the weights mean: a run may resume from a
# checkpoint with other values.
TRAINING_KNOBS = ("balance", "balance_coeff", "aux_free_rate", "z_loss_coeff", "dispatcher",
                  "ep_balance_coeff", "ep_balance_groups", "expert_impl", "widen_block",
                  "widen_steps")
# model fields that do not decide the weights (checkpoints move between them): the kernels, and
# the sequence length (RoPE has no learned positions; moue-eval --tokens evaluates any length)
IMPLEMENTATION_KNOBS = ("transformer_impl", "seq_length")

SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
            "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
            "logging": LoggingConfig, "elastic": ElasticConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(mock=True))
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
        """The fields that decide what the weights are and mean: a checkpoint loads only into a
        run with the same ones. The rest (balance, dispatcher, learning rate, ...) may change
        when a run resumes."""
        moe = {k: v for k, v in dataclasses.asdict(self.moe).items() if k not in TRAINING_KNOBS}
        model = {k: v for k, v in dataclasses.asdict(self.model).items()
                 if k not in IMPLEMENTATION_KNOBS}
        return {"model": model, "moe": moe}


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
    if "data" not in sections:
        sections["data"] = DataConfig(mock=True)
    return RunConfig(**sections)
