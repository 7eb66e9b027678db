"""Test configuration: markers and the GPU skip.

Markers: ``gpu`` (needs a CUDA GPU; skipped where none is present), ``slow``, ``compat`` (also
run against the newest megatron-core 0.19.x by CI).
"""

import pytest
import torch

import parallel  # noqa: F401  (prepares Megatron-Core's import: see parallel.compat)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
