"""What this machine can run, decided in one place, and the run's implementation plan.

``Capabilities.detect()`` looks once at the machine: a CUDA GPU and its compute capability,
Transformer Engine (importable, its version). ``plan`` turns a run's requests
(``model.transformer_impl``, ``moe.expert_impl``, ``train.precision``, ``train.fp8_recipe``)
into a ``Plan`` (layer spec, pool implementation, precision, fusions), or refuses with a
``UserError`` naming what is missing and the fix, before any model is built.

FP8 recipes by GPU (Transformer Engine 2.x): FP8 needs compute capability 8.9 or newer (Ada,
Hopper, Blackwell); ``tensorwise`` (current scaling) and ``delayed`` run there, ``blockwise``
(128-wide block scaling) on Hopper (9.x), ``mxfp8`` (microscaling) on Blackwell (10.x and newer).
``delayed`` keeps one amax history per module; the pool is one module serving every MoE layer,
so its history would mix the layers' activations: moue refuses it for models with MoE layers
(the other recipes compute their scales from the current tensor and carry no history).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass

import torch

from parallel.errors import UserError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
EXPERT_IMPLS = ("auto", "sequential", "grouped")
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
FP8_RECIPES = ("tensorwise", "blockwise", "mxfp8", "delayed")
GPU_IMAGE = "run in the GPU image (docker/, NGC PyTorch with Transformer Engine)"


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    compute_capability: tuple[int, int] | None = None
    te_version: str | None = None  # None: Transformer Engine is not importable
    device_name: str | None = None
    # apex's fused_weight_gradient_mlp_cuda: Megatron's own linears (the output layer) need it
    # for gradient-accumulation fusion; the NGC PyTorch images bring it.
    wgrad_fusion: bool = False
    memory_bytes: int | None = None  # the GPU's memory (None: no GPU)

    @classmethod
    @functools.cache  # the machine does not change while a process runs
    def detect(cls) -> Capabilities:
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda,
                   compute_capability=tuple(torch.cuda.get_device_capability()) if cuda else None,
                   te_version=_te_version(),
                   device_name=torch.cuda.get_device_name() if cuda else None,
                   wgrad_fusion=cuda and importlib.util.find_spec(
                       "fused_weight_gradient_mlp_cuda") is not None,
                   memory_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else None)

    @classmethod
    def reference_gpu(cls) -> Capabilities:
        """An H100 (Hopper, 9.0) with Transformer Engine: what the dry run plans for a GPU."""
        return cls(cuda=True, compute_capability=(9, 0), te_version="2.11",
                   device_name="H100 with Transformer Engine (reference)", wgrad_fusion=True,
                   memory_bytes=80 * 2**30)

    @property
    def transformer_engine(self) -> bool:
        """Transformer Engine's layers can run: it imports and there is a CUDA GPU."""
        return self.cuda and self.te_version is not None

    def fp8_recipes(self) -> tuple[str, ...]:
        if not self.transformer_engine or self.compute_capability < (8, 9):
            return ()
        major = self.compute_capability[0]
        return ("tensorwise", "delayed", *(("blockwise",) if major == 9 else ()),
                *(("mxfp8",) if major >= 10 else ()))


def _te_version() -> str | None:
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    try:
        import transformer_engine

        return str(getattr(transformer_engine, "__version__", "unknown"))
    except Exception:  # an image with a broken TE install: treat it as absent
        return None


@dataclass(frozen=True)
class Plan:
    """How a run is built on this machine."""

    transformer_impl: str  # local | transformer_engine: Megatron-Core's layer spec
    expert_impl: str  # sequential | grouped: the pool
    grouped_gemm: str | None  # transformer_engine | torch: the grouped pool's GEMM
    precision: str  # fp32 | bf16 | fp8 (fp8: bf16 weights, FP8 GEMMs)
    fp8_recipe: str | None
    fusions: bool  # Megatron's kernel fusions: bias-dropout-add, masked softmax, RoPE, SwiGLU
    grad_accum_fusion: bool  # weight gradients accumulated into main_grad in the GEMM

    def describe(self) -> dict:
        return asdict(self)


def plan(caps: Capabilities, *, transformer_impl: str, expert_impl: str, precision: str,
         fp8_recipe: str, has_experts: bool, grad_accum_fusion: bool | None = None) -> Plan:
    """The run's plan on a machine with ``caps``, or a ``UserError`` naming what is missing.

    ``grad_accum_fusion`` (``train.grad_accum_fusion``): None is on where the GPU kernels are
    (Transformer Engine's layers and apex's wgrad kernel); True on a GPU needs apex's kernel
    (Megatron's own linears call it), and on a CPU runs the CPU stand-ins of both libraries
    (``parallel.cpu_backend``, ``moue.model.te_standins``): the GPU path's weight-gradient
    accumulation, for tests."""
    where = caps.device_name or ("a CUDA GPU" if caps.cuda else "this CPU machine")
    if grad_accum_fusion and caps.cuda and not caps.wgrad_fusion:
        raise UserError(f"train.grad_accum_fusion=true: apex's fused_weight_gradient_mlp_cuda "
                        f"(which Megatron-Core's own linears call) is not installed on {where}; "
                        f"{GPU_IMAGE} (its NGC base brings apex), or leave "
                        "train.grad_accum_fusion unset")
    if transformer_impl == "transformer_engine" and not caps.transformer_engine:
        missing = "Transformer Engine is not installed" if caps.te_version is None else "no CUDA GPU"
        raise UserError(f"model.transformer_impl=transformer_engine: {missing} on {where}; "
                        f"{GPU_IMAGE}, or use model.transformer_impl=local (or auto)")
    te = transformer_impl == "transformer_engine" or (transformer_impl == "auto"
                                                      and caps.transformer_engine)
    if precision == "fp8":
        if not te:
            why = ("model.transformer_impl=local was asked for" if caps.transformer_engine
                   else "Transformer Engine is not installed" if caps.cuda
                   else "there is no CUDA GPU")
            raise UserError(f"train.precision=fp8 runs Transformer Engine's FP8 GEMMs, and {why} "
                            f"on {where}; {GPU_IMAGE} with model.transformer_impl=auto, or use "
                            "train.precision=bf16")
        if fp8_recipe == "delayed" and has_experts:
            raise UserError("train.fp8_recipe=delayed: delayed scaling keeps one amax history per "
                            "module, and the pool is one module serving every MoE layer, so its "
                            "history would mix the layers; use train.fp8_recipe=tensorwise "
                            "(or blockwise on Hopper, mxfp8 on Blackwell)")
        supported = caps.fp8_recipes()
        if fp8_recipe not in supported:
            raise UserError(f"train.fp8_recipe={fp8_recipe} is not supported on {where} (compute "
                            f"capability {caps.compute_capability}); supported here: "
                            f"{', '.join(supported) or 'none (FP8 needs compute capability 8.9+)'}"
                            "; use one of them or train.precision=bf16")
    grouped = expert_impl == "grouped" or (expert_impl == "auto" and te)
    return Plan(transformer_impl="transformer_engine" if te else "local",
                expert_impl=("grouped" if grouped else "sequential") if has_experts else "none",
                grouped_gemm=("transformer_engine" if te else "torch") if grouped and has_experts
                else None,
                precision=("bf16" if caps.cuda else "fp32") if precision == "auto" else precision,
                fp8_recipe=fp8_recipe if precision == "fp8" else None,
                fusions=te, grad_accum_fusion=(te and caps.wgrad_fusion
                                               if grad_accum_fusion is None else grad_accum_fusion))
