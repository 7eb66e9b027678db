"""The CPU stand-ins for Transformer Engine's linears keep TE's contract (moue.model.te_standins).

A module called twice in one micro-batch, the second call on the first one's output (as layer 2
calls the pool on what layer 1 made): with gradient-accumulation fusion and the wrapper's
``is_first_microbatch`` at its default, the first call's backward runs last and overwrites
``main_grad``, as TE does; with ``disable_parameter_transpose_cache`` (what moue sets on the pool)
both calls accumulate, giving autograd's gradient. Without fusion the gradient goes through
autograd and ``main_grad`` is untouched.
"""

from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.model.pool import accumulate_on_every_call
from moue.model.te_standins import TorchExpertColumnLinear, TorchGroupedLinear

pytestmark = pytest.mark.compat  # also run against megatron-core 0.19

SIZE = 8  # in = out, so a call can take the previous one's output


class _Group:
    def size(self):
        return 1

    def rank(self):
        return 0


def _config(fusion: bool) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=SIZE, num_attention_heads=1,
                             gradient_accumulation_fusion=fusion, use_cpu_initialization=True,
                             add_bias_linear=False)


def _grouped(fusion: bool) -> TorchGroupedLinear:
    groups = SimpleNamespace(ep=_Group(), expt_tp=_Group(), expt_dp=_Group())
    return TorchGroupedLinear(3, SIZE, SIZE, config=_config(fusion),
                              init_method=torch.nn.init.normal_, bias=False, skip_bias_add=True,
                              is_expert=True, pg_collection=groups)


def _expert(fusion: bool, monkeypatch) -> TorchExpertColumnLinear:
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)  # no apex kernel is called
    return TorchExpertColumnLinear(SIZE, SIZE, config=_config(fusion),
                                   init_method=torch.nn.init.normal_, bias=False,
                                   is_expert=True, gather_output=False, skip_bias_add=True,
                                   tp_group=_Group())


def _weights(module) -> list[torch.Tensor]:
    return [p for _, p in sorted(module.named_parameters())]


def _inputs(rows: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, SIZE, generator=g)
    return x, torch.randn(rows, SIZE, generator=g)


def _twice(module, splits_first, splits_second):
    """Call ``module`` on x, then on its output; backward a fixed random projection."""
    x, dy = _inputs(sum(splits_first))
    call = ((lambda t, s: module(t, s)[0]) if isinstance(module, TorchGroupedLinear)
            else (lambda t, s: module(t)[0]))
    call(call(x, splits_first), splits_second).backward(dy)


def _autograd_reference(weights, splits_first, splits_second) -> list[torch.Tensor]:
    """The same two calls written out in torch: row group g times weight g, then autograd."""
    leaves = [w.detach().clone().requires_grad_() for w in weights]

    def call(t, splits):
        return torch.cat([part @ w.t() for part, w in zip(t.split(splits), leaves, strict=True)])

    x, dy = _inputs(sum(splits_first))
    call(call(x, splits_first), splits_second).backward(dy)
    return [w.grad for w in leaves]


def _with_main_grad(module, fill: float):
    for w in _weights(module):
        w.main_grad = torch.full_like(w, fill)
        w.grad_added_to_main_grad = False
    return module


@pytest.mark.parametrize("kind", ["grouped", "expert"])
def test_fused_gradient_follows_transformer_engine(kind, monkeypatch):
    make = _grouped if kind == "grouped" else (lambda f: _expert(f, monkeypatch))
    # The grouped linear: 3 experts, the second without tokens on the first call.
    splits = ([3, 0, 5], [2, 4, 2]) if kind == "grouped" else ([8], [8])

    plain = _with_main_grad(make(False), fill=0.0)
    want = _autograd_reference(_weights(plain), *splits)
    assert all(w.abs().sum() > 0 for w in want)
    if kind == "grouped":  # without fusion: autograd's gradient in .grad, main_grad untouched
        _twice(plain, *splits)  # (the expert linear is then Megatron's local one, tested there)
        for w, r in zip(_weights(plain), want, strict=True):
            torch.testing.assert_close(w.grad, r, rtol=1e-6, atol=1e-6)
            assert not w.main_grad.any() and not w.grad_added_to_main_grad

    # TE's default: the first call (is_first_microbatch=True) overwrites main_grad.
    first_overwrites = _with_main_grad(make(True), fill=1.0)
    for w, src in zip(_weights(first_overwrites), _weights(plain), strict=True):
        w.data.copy_(src.data)
    _twice(first_overwrites, *splits)
    got = [w.main_grad for w in _weights(first_overwrites)]
    assert all(w.grad_added_to_main_grad for w in _weights(first_overwrites))
    assert all(w.grad is None or not w.grad.any() for w in _weights(first_overwrites))
    lost = [float((g - r).norm() / r.norm()) for g, r in zip(got, want, strict=True)]
    assert max(lost) > 0.05, lost  # the second call's gradient is gone
    if kind == "grouped":  # no tokens on the overwriting call: TE writes zeros
        assert not got[1].any()

    # The pool's setting: every call accumulates into what main_grad held.
    fixed = _with_main_grad(make(True), fill=0.5)
    accumulate_on_every_call(fixed)
    for w, src in zip(_weights(fixed), _weights(plain), strict=True):
        w.data.copy_(src.data)
    _twice(fixed, *splits)
    for w, r in zip(_weights(fixed), want, strict=True):
        torch.testing.assert_close(w.main_grad, r + 0.5, rtol=1e-6, atol=1e-6)


def test_wrapper_passes_none_once_the_cache_is_disabled():
    module = _grouped(True)
    assert module.is_first_microbatch is True
    assert module._next_is_first_microbatch() is True
    assert module._next_is_first_microbatch() is False
    module.is_first_microbatch = True  # as MegatronModule.set_is_first_microbatch does (FP8)
    accumulate_on_every_call(module)
    assert module._next_is_first_microbatch() is None
