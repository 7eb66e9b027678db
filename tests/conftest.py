"""Test configuration: markers and the GPU skip.

Markers: ``gpu`` (needs a CUDA GPU; skipped where none is present), ``slow``, ``compat`` (also
run against the newest megatron-core 0.19.x by CI).
"""

import pytest
import torch

import parallel  # noqa: F401  (prepares Megatron-Core's import: see parallel.compat)
from tests import distributed


def pytest_collection_finish(session):
    """The shared launches run only the case modules (a test file's ``CASES``) of the tests this
    session selected: ``-m compat`` or one file does not pay for the others' cases."""
    distributed.selected = {getattr(item.module, "CASES", None) for item in session.items
                            if getattr(item, "module", None) is not None}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Figures the GPU tests measured, each with the bound it was held to: `make test-gpu` prints them
# as one Markdown table (case, figure, measured, bound) to paste into docs/benchmarks.md.
FIGURES: list[tuple[str, str, float, str, bool]] = []


@pytest.fixture
def figure():
    """``figure(case, what, measured, bound, ok)`` records one row and returns ``ok``."""
    def record(case: str, what: str, measured: float, bound: str, ok: bool) -> bool:
        FIGURES.append((case, what, measured, bound, ok))
        return ok
    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write(f"GPU figures ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
          f", torch {torch.__version__}):")
    write("| case | figure | measured | bound | held |")
    write("|---|---|---|---|---|")
    for case, what, measured, bound, ok in FIGURES:
        write(f"| {case} | {what} | {measured:.3g} | {bound} | {'yes' if ok else 'NO'} |")
