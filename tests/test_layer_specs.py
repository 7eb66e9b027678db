"""The sequence-parallel-safe torch norm of the local (non-Transformer-Engine) spec."""

import pytest
import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.model.layer_specs import SequenceParallelTorchNorm

pytestmark = pytest.mark.compat


def _config(sequence_parallel: bool) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                             tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                             normalization="RMSNorm", use_cpu_initialization=True)


def test_megatron_torch_norm_refuses_sequence_parallel():
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        WrappedTorchNorm(_config(True), 16)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_norm_is_built_and_tagged_for_the_tp_grad_all_reduce(sequence_parallel):
    config = _config(sequence_parallel)
    norm = SequenceParallelTorchNorm(config, 16, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert [p.sequence_parallel for p in norm.parameters()] == [sequence_parallel]
    assert config.sequence_parallel is sequence_parallel  # the caller's config is untouched
    x = torch.randn(3, 16)
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    torch.testing.assert_close(norm(x), ref(x))
