"""Run configuration: frozen sections loaded from YAML with dotted ``key=value`` overrides.

Each section validates its own fields in ``__post_init__`` (``ValueError`` naming the field, the
value and the fix); ``RunConfig`` checks the rules that span sections. Nothing here has side
effects. Megatron's ``TransformerConfig`` is built from these in ``moue.megatron_config`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


def _check(ok: bool, name: str, value, fix: str):
    if not ok:
        raise ValueError(f"{name}={value!r}: {fix}")


def _positive(section: str, obj, *names: str):
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{section}.{n}", v,
               "must be a positive integer")


def _one_of(name: str, value, choices):
    _check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: as many as attention heads (no GQA)
    seq_length: int = 128
    vocab_size: int = 256
    ffn_hidden_size: int = 256  # dense (non-MoE) layers
    moe_layer_freq: int = 1  # every k-th layer (0, k, 2k, ...) is MoE; 0: dense, no MoE layers
    normalization: str = "RMSNorm"

    def __post_init__(self):
        _positive("model", self, "num_layers", "hidden_size", "num_attention_heads",
                  "seq_length", "vocab_size", "ffn_hidden_size")
        _check(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 0,
               "model.moe_layer_freq", self.moe_layer_freq,
               "must be an integer >= 0 (0 builds the dense model, without MoE layers)")
        if self.num_query_groups is not None:
            _positive("model", self, "num_query_groups")
            _check(self.num_attention_heads % self.num_query_groups == 0,
                   "model.num_query_groups", self.num_query_groups,
                   f"must divide model.num_attention_heads={self.num_attention_heads}")
        _check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
               self.hidden_size, f"must be a multiple of model.num_attention_heads="
               f"{self.num_attention_heads}")
        _one_of("model.normalization", self.normalization, ("RMSNorm", "LayerNorm"))

    @property
    def dense(self) -> bool:
        """No MoE layers: the dense baseline (every MLP has ``ffn_hidden_size``)."""
        return self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE layers."""
        return [] if self.dense else [i for i in range(self.num_layers) if i % self.moe_layer_freq == 0]


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = 16  # E: the size of the pool
    expert_ffn_hidden_size: int = 64
    topk: int = 2
    topology: str = "rotational"  # standard | rotational | full
    window: int = 8  # w (rotational)
    stride: int = 4  # s (rotational)
    shared_experts: int = 0  # always-on experts, each of expert_ffn_hidden_size
    router_state_dim: int = 64  # d_r; 0 turns the trajectory state off
    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False
    balance: str = "uelb"  # uelb | per_layer | aux_free | none
    balance_coeff: float = 1e-2
    aux_free_rate: float = 1e-3  # per-step bias update of the aux_free balance
    z_loss_coeff: float = 0.0
    dispatcher: str = "alltoall"  # alltoall | allgather

    def __post_init__(self):
        _positive("moe", self, "num_experts", "expert_ffn_hidden_size", "topk", "window",
                  "stride")
        for n in ("shared_experts", "router_state_dim"):
            v = getattr(self, n)
            _check(isinstance(v, int) and v >= 0, f"moe.{n}", v, "must be an integer >= 0")
        from moue.balance import BALANCES
        from moue.topology import TOPOLOGIES

        _one_of("moe.topology", self.topology, sorted(TOPOLOGIES))
        _one_of("moe.balance", self.balance, sorted(BALANCES))
        _one_of("moe.score_function", self.score_function, ("softmax", "sigmoid"))
        _one_of("moe.dispatcher", self.dispatcher, ("alltoall", "allgather"))
        for n in ("balance_coeff", "aux_free_rate", "z_loss_coeff"):
            _check(getattr(self, n) >= 0, f"moe.{n}", getattr(self, n), "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # None: tp when ep == 1, else 1 (see parallel.layout)

    def __post_init__(self):
        _positive("parallel", self, "tp", "pp", "ep")
        if self.etp is not None:
            _positive("parallel", self, "etp")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    steps: int = 100
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | wsd
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16
    eval_interval: int = 50
    eval_iters: int = 4
    on_nan: str = "stop"  # stop | skip: what a NaN/Inf loss does (skip: no update, data moves on)

    def __post_init__(self):
        _positive("train", self, "micro_batch_size", "global_batch_size", "steps")
        _one_of("train.on_nan", self.on_nan, ("stop", "skip"))
        _check(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
               self.global_batch_size,
               f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        _check(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.steps,
               "train.warmup_steps", self.warmup_steps,
               f"must be a whole number below train.steps={self.steps}")
        _one_of("train.schedule", self.schedule, ("cosine", "wsd"))
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str | None = None  # prefix of a Megatron indexed dataset (.bin/.idx)
    blend: list | None = None  # [weight, prefix, weight, prefix, ...]
    split: str = "98,2,0"
    tokenizer: str = "byte"
    mock: bool = False  # synthetic tokens (Megatron's mock dataset): no files needed
    seed: int | None = None  # order of the train and validation samples; None: train.seed

    def __post_init__(self):
        _check(self.mock or self.path or self.blend, "data.path", self.path,
               "set data.path (or data.blend) to a preprocessed dataset, or data.mock=true "
               "for synthetic tokens")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str | None = None  # None: no checkpoints
    interval: int = 0  # steps between checkpoints; 0 turns periodic checkpoints off
    keep_last: int = 2

    def __post_init__(self):
        _check(isinstance(self.interval, int) and self.interval >= 0, "checkpoint.interval",
               self.interval, "must be an integer >= 0 (0 turns periodic checkpoints off)")
        _positive("checkpoint", self, "keep_last")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    dir: str = "runs/latest"  # TensorBoard events and plots
    interval: int = 1  # steps between logged lines
    metrics_file: str | None = None  # one JSON line per logged step; None: <dir>/metrics.jsonl

    def __post_init__(self):
        _positive("logging", self, "interval")


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
            "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
            "logging": LoggingConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(mock=True))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        moe = self.moe
        if self.model.dense:  # the moe section is not used
            _check(self.parallel.ep == 1, "parallel.ep", self.parallel.ep,
                   "the dense model (model.moe_layer_freq=0) has no experts to split; "
                   "use parallel.ep=1 (its ranks then do data parallelism)")
            return
        if moe.topology == "rotational":
            _check(moe.window <= moe.num_experts, "moe.window", moe.window,
                   f"the window cannot be larger than the pool (moe.num_experts="
                   f"{moe.num_experts}); use moe.window<={moe.num_experts}")
            _check(moe.topk <= moe.window, "moe.topk", moe.topk,
                   f"top-k cannot exceed the window (moe.window={moe.window})")
        self.topology()  # builds and validates the eligibility mask (standard: E = L*N)

    @property
    def data_seed(self) -> int:
        """Seed of the sample order: ``data.seed``, else ``train.seed`` (Megatron-LM's one seed)."""
        return self.train.seed if self.data.seed is None else self.data.seed

    def topology(self):
        """The eligibility topology of the MoE layers; None for the dense model."""
        from moue.topology import build_topology

        if self.model.dense:
            return None

        return build_topology(self.moe, num_moe_layers=len(self.model.moe_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nearest(key: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(prefix + c for c in close)}?"
    return f"; valid: {', '.join(prefix + v for v in valid)}"


def _set_dotted(tree: dict, dotted: str, value):
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r} in {dotted!r}"
                         f"{_nearest(section, SECTIONS)}")
    if not key or "." in key:
        raise ValueError(f"override {dotted!r}: use section.key=value, e.g. moe.window=8")
    tree.setdefault(section, {})[key] = value


def _coerce(name: str, annotation: str, value):
    """YAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``): take numbers as declared."""
    kinds = annotation.replace(" ", "").split("|")
    if isinstance(value, bool) or value is None:
        return value
    try:
        if "float" in kinds and isinstance(value, (int, str)):
            return float(value)
        if "int" in kinds and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: must be a number") from None
    return value


def _build_section(name: str, values: dict):
    cls = SECTIONS[name]
    types = {f.name: f.type for f in fields(cls)}
    for key in values:
        if key not in types:
            raise ValueError(f"unknown key {name}.{key}{_nearest(key, types, f'{name}.')}")
    return cls(**{k: _coerce(f"{name}.{k}", types[k], v) for k, v in values.items()})


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config and apply ``section.key=value`` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a config file is a mapping of sections (model:, moe:, ...)")
        for section, values in tree.items():
            if section not in SECTIONS:
                raise ValueError(f"{path}: unknown section {section!r}{_nearest(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping of keys")
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r}: use section.key=value, e.g. moe.window=8")
        _set_dotted(tree, dotted.strip(), yaml.safe_load(raw))
    sections = {name: _build_section(name, values) for name, values in tree.items()}
    if "data" not in sections:
        sections["data"] = DataConfig(mock=True)
    return RunConfig(**sections)
