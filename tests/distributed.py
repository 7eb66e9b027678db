"""Run many multi-rank test cases in one ``torchrun`` launch (launches cost ~10 s each on 2 cores).

A case module defines ``CASES = Cases()`` and registers functions with ``@CASES.case(nproc=2)``;
each returns a JSON-serialisable value (the numbers the test asserts on). ``launch(module,
nproc)`` starts one torchrun with that many CPU processes, which run every case registered for
that world size in order and write one JSON file per rank; pytest then asserts on the values.
Results are cached per session, so several tests share one launch.

The case modules in ``SHARED_LAUNCH`` need nothing from their tests (no environment, no order
between world sizes), so one torchrun per world size runs all of those the session's tests use
(``conftest.py`` narrows ``selected`` to them): each launch saves a process start and a Megatron
import (about 10 s on 2 cores; docs/testing.md).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def max_rel(values, reference) -> float:
    """Largest relative difference between two equally long sequences of numbers."""
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference, strict=True))


class Cases:
    """An ordered registry of distributed cases: name -> (function, number of processes)."""

    def __init__(self):
        self.fns: dict[str, tuple[Callable[[], object], int]] = {}

    def add(self, name: str, fn: Callable[[], object], nproc: int):
        if name in self.fns:
            raise ValueError(f"case {name!r} registered twice")
        self.fns[name] = (fn, nproc)

    def case(self, nproc: int = 2, name: str | None = None):
        def register(fn):
            self.add(name or fn.__name__, fn, nproc)
            return fn
        return register

    def names(self, nproc: int) -> list[str]:
        return [n for n, (_, p) in self.fns.items() if p == nproc]


@dataclass
class Results:
    """Per-rank outcomes of one launch: ``results[name]`` is the list of per-rank values."""

    by_rank: list[dict]
    log: str

    def __getitem__(self, name: str) -> list:
        values = []
        for rank, outcomes in enumerate(self.by_rank):
            if name not in outcomes:
                pytest.fail(f"case {name!r} did not run on rank {rank}; launch log tail:\n"
                            f"{self.log[-4000:]}")
            outcome = outcomes[name]
            if not outcome["ok"]:
                pytest.fail(f"case {name!r} failed on rank {rank}:\n{outcome['traceback']}")
            values.append(outcome["value"])
        return values

    def error(self, name: str) -> str | None:
        """The error text of a case on rank 0 (None if it succeeded)."""
        outcome = self.by_rank[0].get(name)
        if outcome is None:
            pytest.fail(f"case {name!r} did not run; launch log tail:\n{self.log[-4000:]}")
        return None if outcome["ok"] else outcome["error"]


def gpu_test_env() -> dict:
    """The environment of GPU test runs: Megatron's compiled fusions on (torch.compile is not
    disabled), fp32 as fp32 (``NVIDIA_TF32_OVERRIDE=0`` keeps cuBLAS and cuDNN from using TF32,
    which NGC's images turn on with ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``; Transformer Engine's
    fp32 GEMMs honour the same switch), and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` as Megatron wants
    for TP communication overlap."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHDYNAMO_DISABLE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")}
    return {**env, "NVIDIA_TF32_OVERRIDE": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


# Case modules that share one launch per world size, and those of them the session uses.
# launch_env runs first: its cases read the state the worker's start-up left.
SHARED_LAUNCH = ("tests.cases.launch_env", "tests.cases.training", "tests.cases.moue_model",
                 "tests.cases.megatron_equivalence", "tests.cases.wgrad_fusion")
selected: set[str] = set(SHARED_LAUNCH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, nproc: int, launcher: str = "torchrun", device: str = "cpu",
           only: tuple[str, ...] = (), env_vars: tuple[tuple[str, str], ...] = (),
           timeout: float = 900) -> Results:
    """Run every case of ``module`` registered for ``nproc`` processes in one launch.

    ``launcher``: ``torchrun`` (the default) or ``mpirun`` (mpiexec of the installed MPI; ranks
    are read through mpi4py). ``device``: ``cpu`` (GPUs hidden, gloo, the CPU backend) or
    ``cuda`` (nccl). ``only``: run just these cases. ``env_vars``: extra environment.
    A module of ``SHARED_LAUNCH`` launched plainly (torchrun, CPU, every case, no environment)
    runs in the one launch of every selected shared module for this world size.
    """
    if (module in SHARED_LAUNCH and launcher == "torchrun" and device == "cpu" and not only
            and not env_vars):
        modules = tuple(m for m in SHARED_LAUNCH if m in selected or m == module)
        return _launch(modules, nproc, launcher, device, only, env_vars, timeout)[module]
    return _launch((module,), nproc, launcher, device, only, env_vars, timeout)[module]


@functools.cache
def _launch(modules: tuple[str, ...], nproc: int, launcher: str, device: str,
            only: tuple[str, ...], env_vars: tuple[tuple[str, str], ...],
            timeout: float) -> dict[str, Results]:
    out = Path(tempfile.mkdtemp(prefix="moue-dist-"))
    base = (gpu_test_env() if device == "cuda"
            else dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1"))
    env = dict(base, OMP_NUM_THREADS="1", MOUE_TEST_DEVICE=device,
               MOUE_TEST_CASES=",".join(only), **dict(env_vars),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = ["-m", "tests.dist_worker", ",".join(modules), str(out)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *worker]
    elif launcher == "mpirun":
        env["MASTER_PORT"] = str(_free_port())
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
        cmd = [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", str(nproc),
               *(x for var in ("PYTHONPATH", "MASTER_PORT", "MOUE_TEST_DEVICE", "MOUE_TEST_CASES",
                         "CUDA_VISIBLE_DEVICES") if var in env for x in ("-x", var)),
               sys.executable, *worker]
    else:
        raise ValueError(f"launcher={launcher!r}: use 'torchrun' or 'mpirun'")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    by_rank = []
    for rank in range(nproc):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"torchrun of {', '.join(modules)} (nproc={nproc}) wrote no results for "
                        f"rank {rank} (exit {proc.returncode}):\n{log[-6000:]}")
        by_rank.append(json.loads(path.read_text()))
    return {m: Results([outcomes.get(m, {}) for outcomes in by_rank], log) for m in modules}
