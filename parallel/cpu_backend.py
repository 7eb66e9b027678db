"""Megatron-Core on CPU processes with gloo: the adaptations, one per Megatron-Core call site.

Megatron-Core assumes CUDA in many places (Megatron-LM #3025). This module adapts exactly the
places listed in docs/cpu_backend.md so the whole stack (parallel state, tensor-parallel
layers, MoE dispatchers, DDP, the distributed optimizer, schedules, checkpoints) runs on CPU
processes, for tests, CI and debugging without a GPU.

Principles:
- Switched on only when the run's device is CPU (``enable`` refuses when CUDA is available).
- Narrow: an adaptation replaces a name inside the Megatron-Core module that uses it where that
  suffices. Where Megatron calls a torch API inline from dozens of places
  (``torch.cuda.current_device()`` ~175 times), the torch function is replaced, but the
  replacement changes the answer **only for callers inside ``megatron.*``**; every other caller
  gets torch's own behaviour, unchanged.
- Reversible: ``enable`` returns a handle whose ``disable`` restores every name, so tests can show
  that each adaptation is needed (the suite switches each one off alone and expects the failure
  it names).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

_CPU = torch.device("cpu")


def _caller_is_megatron(depth: int) -> bool:
    """Whether the frame ``depth`` levels above the caller belongs to a megatron.* module."""
    frame = sys._getframe(depth + 1)
    return frame.f_globals.get("__name__", "").startswith("megatron.")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


# --------------------------------------------------------------------------------------------
# Patch bookkeeping


@dataclass
class _Patch:
    owner: object
    name: str
    new: object
    old: object = None

    def apply(self):
        self.old = getattr(self.owner, self.name, _MISSING)
        setattr(self.owner, self.name, self.new)

    def undo(self):
        if self.old is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.old)


_MISSING = object()


@dataclass(frozen=True)
class Adaptation:
    """One adaptation: the Megatron-Core call site it covers, the symptom without it, its patches."""

    name: str
    call_site: str
    symptom: str
    patches: Callable[[], list[_Patch]]


ADAPTATIONS: dict[str, Adaptation] = {}


def adaptation(name: str, *, call_site: str, symptom: str):
    """Register a function returning the patches of one adaptation."""

    def register(fn: Callable[[], list[_Patch]]):
        ADAPTATIONS[name] = Adaptation(name, call_site, symptom, fn)
        return fn

    return register


def _module(name: str):
    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------
# The adaptations


@adaptation(
    "current_device",
    call_site="torch.cuda.current_device() as device=, ~175 call sites: "
    "distributed/param_and_grad_buffer.py, tensor_parallel/mappings.py, tensor_parallel/layers.py, "
    "transformer/moe/router.py, pipeline_parallel/schedules.py, utils.py (GlobalMemoryBuffer)",
    symptom="Torch not compiled with CUDA enabled",
)
def _current_device() -> list[_Patch]:
    original = torch.cuda.current_device

    def current_device():
        return _CPU if _caller_is_megatron(1) else original()

    return [_Patch(torch.cuda, "current_device", current_device)]


class _CpuRngTracker:
    """Methods of Megatron's CudaRNGStatesTracker re-expressed on the CPU generator.

    On a CPU process the "device" generator *is* the CPU generator, so a tracked state is a CPU
    generator state and forking swaps it in and out.
    """

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@adaptation(
    "rng_tracker",
    call_site="tensor_parallel/random.py: CudaRNGStatesTracker.add/fork, _get_cuda_rng_state, "
    "_set_cuda_rng_state (model_parallel_cuda_manual_seed, activation recompute)",
    symptom="Torch not compiled with CUDA enabled",  # torch.cuda.get_rng_state()
)
def _rng_tracker() -> list[_Patch]:
    random = _module("megatron.core.tensor_parallel.random")
    tracker = random.CudaRNGStatesTracker
    return [
        _Patch(tracker, "add", _CpuRngTracker.add),
        _Patch(tracker, "fork", _CpuRngTracker.fork),
        _Patch(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        _Patch(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
    ]


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered, so all are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@adaptation(
    "streams",
    call_site="torch.cuda.Stream/Event/stream/current_stream/default_stream/synchronize in "
    "transformer/moe/token_dispatcher.py (MoEAlltoAllTokenDispatcher), "
    "distributed/param_and_grad_buffer.py, distributed/distributed_data_parallel.py, "
    "pipeline_parallel/p2p_communication.py",
    symptom="Torch not compiled with CUDA enabled",  # torch.cuda.Stream() on a CPU build
)
def _streams() -> list[_Patch]:
    cuda = torch.cuda
    originals = {n: getattr(cuda, n) for n in
                 ("Stream", "Event", "stream", "current_stream", "default_stream", "synchronize")}

    def scoped(name, cpu_version):
        def fn(*args, **kwargs):
            if _caller_is_megatron(1):
                return cpu_version(*args, **kwargs)
            return originals[name](*args, **kwargs)
        return fn

    class Stream(_NoStream):
        # A class, because Megatron also uses torch.cuda.Stream in annotations and isinstance.
        def __new__(cls, *args, **kwargs):
            if not _caller_is_megatron(1):
                return originals["Stream"](*args, **kwargs)
            return super().__new__(cls)

    class Event(_NoStream):
        def __new__(cls, *args, **kwargs):
            if not _caller_is_megatron(1):
                return originals["Event"](*args, **kwargs)
            return super().__new__(cls)

    return [
        _Patch(cuda, "Stream", Stream),
        _Patch(cuda, "Event", Event),
        _Patch(cuda, "stream", scoped("stream", lambda *a, **k: contextlib.nullcontext())),
        _Patch(cuda, "current_stream", scoped("current_stream", lambda *a, **k: _NoStream())),
        _Patch(cuda, "default_stream", scoped("default_stream", lambda *a, **k: _NoStream())),
        _Patch(cuda, "synchronize", scoped("synchronize", lambda *a, **k: None)),
    ]


@adaptation(
    "te_general_gemm",
    call_site="transformer/moe/moe_utils.py: RouterGatingLinearFunction (0.16.x references "
    "te_general_gemm, which is defined only when Transformer Engine imports; fixed in 0.19)",
    symptom="name 'te_general_gemm' is not defined",
)
def _te_general_gemm() -> list[_Patch]:
    moe_utils = _module("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):
        return []  # defined (TE present, or a release that fixed it): nothing to adapt
    return [_Patch(moe_utils, "te_general_gemm", None)]


def _to_cpu_or_numpy(tensor, as_numpy=False, record_stream=False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


@adaptation(
    "alltoall_splits",
    call_site="transformer/moe/token_dispatcher.py: maybe_move_tensor_to_cpu(as_numpy=True) "
    "converts only CUDA tensors, so tensors reach all_to_all_single as split sizes in "
    "tensor_parallel/mappings.py",
    symptom="all_to_all_single(): incompatible function arguments",
)
def _alltoall_splits() -> list[_Patch]:
    dispatcher = _module("megatron.core.transformer.moe.token_dispatcher")
    return [_Patch(dispatcher, "maybe_move_tensor_to_cpu", _to_cpu_or_numpy)]


class _CpuWgradKernels:
    """apex's ``fused_weight_gradient_mlp_cuda`` on CPU: ``main_grad += grad_output^T input``
    (2-D operands, the sum in fp32 for an fp32 ``main_grad``), as Megatron's linears call it."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.add_(grad_output.float().t() @ total_input.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.add_((grad_output.float().t() @ total_input.float()).to(main_grad.dtype))


@adaptation(
    "apex_wgrad_kernels",
    call_site="tensor_parallel/layers.py: gradient_accumulation_fusion calls apex's "
    "fused_weight_gradient_mlp_cuda in LinearWithGradAccumulationAndAsyncCommunication, and "
    "ColumnParallelLinear refuses to build when it does not import (train.grad_accum_fusion=true)",
    symptom="fused_weight_gradient_mlp_cuda module is not found",
)
def _apex_wgrad_kernels() -> list[_Patch]:
    layers = _module("megatron.core.tensor_parallel.layers")
    if getattr(layers, "_grad_accum_fusion_available", False):
        return []  # apex is installed: its kernels run
    return [_Patch(layers, "_grad_accum_fusion_available", True),
            _Patch(layers, "fused_weight_gradient_mlp_cuda", _CpuWgradKernels)]


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


@adaptation(
    "cuda_device_literals",
    call_site="device='cuda' / .cuda() / pin_memory() / record_stream(): optimizer/optimizer.py "
    "(_scale, found_inf), optimizer/clip_grads.py, optimizer/grad_scaler.py, "
    "pipeline_parallel/schedules.py (total_num_tokens), distributed/param_and_grad_buffer.py, "
    "transformer/moe/moe_utils.py, utils.py",
    symptom="Torch not compiled with CUDA enabled",
)
def _cuda_device_literals() -> list[_Patch]:
    patches = []
    for name in _FACTORIES:
        original = getattr(torch, name)

        def factory(*args, _original=original, **kwargs):
            if _is_cuda_device(kwargs.get("device")) and _caller_is_megatron(1):
                kwargs["device"] = _CPU
                kwargs.pop("pin_memory", None)
            return _original(*args, **kwargs)

        patches.append(_Patch(torch, name, factory))

    tensor = torch.Tensor
    cuda, pin, record = tensor.cuda, tensor.pin_memory, tensor.record_stream

    def to_cuda(self, *args, **kwargs):
        return self if _caller_is_megatron(1) else cuda(self, *args, **kwargs)

    def pin_memory(self, *args, **kwargs):
        return self if _caller_is_megatron(1) else pin(self, *args, **kwargs)

    def record_stream(self, *args, **kwargs):
        return None if _caller_is_megatron(1) else record(self, *args, **kwargs)

    return patches + [
        _Patch(tensor, "cuda", to_cuda),
        _Patch(tensor, "pin_memory", pin_memory),
        _Patch(tensor, "record_stream", record_stream),
    ]


_CUDA_TYPE = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
              torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@adaptation(
    "cuda_type_strings",
    call_site="param.type() compared with 'torch.cuda.*Tensor' strings: "
    "optimizer/distrib_optimizer.py (_build_model_and_main_param_groups), optimizer/optimizer.py "
    "(Float16OptimizerWithFloat16Params), optimizer/clip_grads.py",
    symptom="Wrapped parameters must be one of torch.cuda.FloatTensor",
)
def _cuda_type_strings() -> list[_Patch]:
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if (not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE
                and sys._getframe(1).f_globals.get("__name__", "").startswith(
                    "megatron.core.optimizer")):
            return _CUDA_TYPE[self.dtype]
        return original(self, *args, **kwargs)

    return [_Patch(torch.Tensor, "type", type_)]


# --------------------------------------------------------------------------------------------
# Switching on and off


class CpuBackend:
    """Handle to the applied adaptations; ``disable()`` restores everything."""

    def __init__(self, names: list[str], patches: list[_Patch], applied: dict[str, int]):
        self.names = names
        self.applied = applied  # adaptation -> number of patches it needed on this release
        self._patches = patches

    def disable(self):
        global _ACTIVE
        for patch in reversed(self._patches):
            patch.undo()
        self._patches = []
        if _ACTIVE is self:
            _ACTIVE = None


_ACTIVE: CpuBackend | None = None


def enable(skip: Iterable[str] = ()) -> CpuBackend:
    """Apply every adaptation (except those named in ``skip``) for a CPU-only run.

    Refuses when CUDA is available: the adaptations are for CPU runs only, never a GPU one.
    Idempotent when called again with the same ``skip``.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        raise RuntimeError(
            "parallel.cpu_backend.enable(): CUDA is available on this process; the CPU backend "
            "is only for runs whose device is CPU. Run on the GPU, or hide it with "
            "CUDA_VISIBLE_DEVICES= to force a CPU run."
        )
    skip = set(skip)
    unknown = skip - ADAPTATIONS.keys()
    if unknown:
        raise ValueError(f"unknown CPU adaptations {sorted(unknown)}; known: {sorted(ADAPTATIONS)}")
    names = [n for n in ADAPTATIONS if n not in skip]
    if _ACTIVE is not None:
        if _ACTIVE.names == names:
            return _ACTIVE
        _ACTIVE.disable()
    patches, applied = [], {}
    for name in names:
        own = ADAPTATIONS[name].patches()
        for patch in own:
            patch.apply()
        patches += own
        applied[name] = len(own)
    _ACTIVE = CpuBackend(names, patches, applied)
    return _ACTIVE


def active() -> CpuBackend | None:
    return _ACTIVE


@contextlib.contextmanager
def enabled(skip: Iterable[str] = ()) -> Iterator[CpuBackend]:
    """Context manager form of ``enable``; restores the previous state on exit."""
    previous = _ACTIVE.names if _ACTIVE is not None else None
    backend = enable(skip)
    try:
        yield backend
    finally:
        backend.disable()
        if previous is not None:
            enable(set(ADAPTATIONS) - set(previous))
