"""The CPU backend in one process: scoping to Megatron callers, clean undo, refusal on GPUs.

That each adaptation is *needed* is shown in test_megatron_cpu.py: a training step with that one
adaptation switched off fails in the Megatron-Core file the adaptation names.
"""

import types

import pytest
import torch

from parallel import cpu_backend

pytestmark = [pytest.mark.compat,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only backend")]


def _megatron_function(source: str):
    """A function whose globals say it lives in a megatron.core module (as a call site does)."""
    module = types.ModuleType("megatron.core.fake_call_site")
    exec(source, module.__dict__)  # noqa: S102 - test helper building a fake call site
    return module


def test_megatron_callers_see_cpu_others_see_torch():
    site = _megatron_function(
        "import torch\n"
        "def device(): return torch.cuda.current_device()\n"
        "def zeros(): return torch.zeros(2, device='cuda')\n"
        "def to_cuda(t): return t.cuda()\n"
        "def stream(): return torch.cuda.Stream()\n")
    with cpu_backend.enabled():
        assert site.device() == torch.device("cpu")
        assert site.zeros().device.type == "cpu"
        t = torch.ones(1)
        assert site.to_cuda(t) is t
        site.stream().wait_stream(site.stream())  # no-op stream objects
        # Code outside megatron.* still gets torch's own behaviour (an error without CUDA).
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.current_device()
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
        with pytest.raises((AssertionError, RuntimeError)):
            torch.ones(1).cuda()


def test_type_strings_only_for_megatron_optimizer_modules():
    optimizer_site = types.ModuleType("megatron.core.optimizer.fake")
    exec("def kind(t): return t.type()\n", optimizer_site.__dict__)  # noqa: S102
    with cpu_backend.enabled():
        assert optimizer_site.kind(torch.ones(1)) == "torch.cuda.FloatTensor"
        assert optimizer_site.kind(torch.ones(1, dtype=torch.bfloat16)) == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type() == "torch.FloatTensor"


def _torch_names():
    return [torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize, torch.zeros,
            torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.pin_memory]


def test_disable_restores_every_name():
    if cpu_backend.active() is not None:
        cpu_backend.active().disable()
    before = _torch_names()
    backend = cpu_backend.enable()
    assert all(a is not b for a, b in zip(_torch_names(), before, strict=True))
    backend.disable()
    assert all(a is b for a, b in zip(_torch_names(), before, strict=True))
    assert cpu_backend.active() is None


def test_every_adaptation_names_its_call_site_and_symptom():
    assert len(cpu_backend.ADAPTATIONS) == 8
    for adaptation in cpu_backend.ADAPTATIONS.values():
        assert ".py" in adaptation.call_site, adaptation.name
        assert adaptation.symptom


def test_unknown_adaptation_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU adaptations"):
        cpu_backend.enable(skip={"no_such_thing"})


def test_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="only for runs whose device is CPU"):
        cpu_backend.enable()
