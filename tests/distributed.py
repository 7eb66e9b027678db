"""Run many multi-rank test cases per launch, on test workers kept up for the session.

A case module defines ``CASES = Cases()`` and registers functions with ``@CASES.case(nproc=2)``;
each returns a JSON-serialisable value (the numbers the test asserts on). ``launch(module,
nproc)`` runs every case registered for that world size in order, on CPU processes, and returns
one value per rank; pytest then asserts on the values. Results are cached per session, so several
tests share one launch.

A CPU torchrun launch is a request to ``Workers``: one torchrun per world size stays up for the
session, so only its first launch pays the process start and Megatron's import (about 10 s on 2
cores; docs/testing.md). ``mpirun`` and ``device="cuda"`` launches start processes of their own.

The case modules in ``SHARED_LAUNCH`` need nothing from their tests (no environment, no order
between world sizes), so one request per world size runs all of those the session's tests use
(``conftest.py`` narrows ``selected`` to them).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
    if launcher == "torchrun" and device == "cpu":
        by_rank, log = _workers(nproc).run(modules, only, dict(env_vars), timeout)
        return {m: Results([outcomes.get(m, {}) for outcomes in by_rank], log) for m in modules}
    out = Path(tempfile.mkdtemp(prefix="moue-dist-"))
    env = dict(_base_env(device), MOUE_TEST_CASES=",".join(only), **dict(env_vars))
    worker = ["-m", "tests.dist_worker", ",".join(modules), str(out)]
    if launcher == "torchrun":
        cmd = [*_torchrun(nproc), *worker]
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


def _base_env(device: str) -> dict:
    base = (gpu_test_env() if device == "cuda"
            else dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1"))
    return dict(base, OMP_NUM_THREADS="1", MOUE_TEST_DEVICE=device,
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]


class Workers:
    """One torchrun of ``nproc`` CPU workers kept up for the session (``dist_worker --serve``):
    each launch is a request file its ranks run in order, so only the first launch of a world
    size pays the process start and Megatron's import (about 10 s on 2 cores). A request runs
    from the start-up layout with its own environment variables. If the workers die (a case
    crashed the process) or a request times out, the launch fails with their log and the next
    one starts new workers."""

    def __init__(self, nproc: int):
        self.nproc, self.requests = nproc, 0
        self.dir = Path(tempfile.mkdtemp(prefix=f"moue-workers{nproc}-"))
        self.log_path = self.dir / "log.txt"
        env = dict(_base_env("cpu"), MOUE_TEST_PARENT=str(os.getpid()))
        command = [*_torchrun(nproc), "-m", "tests.dist_worker", "--serve", str(self.dir)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, start: int = 0) -> str:
        return self.log_path.read_text(errors="replace")[start:]

    def run(self, modules: tuple[str, ...], only: tuple[str, ...], env: dict,
            timeout: float) -> tuple[list[dict], str]:
        n, self.requests = self.requests, self.requests + 1
        start = len(self.log())
        ask = self.dir / f".request{n}.json"
        ask.write_text(json.dumps({"modules": list(modules), "only": list(only), "env": env}))
        ask.rename(self.dir / f"request{n}.json")
        results = [self.dir / f"result{n}_rank{r}.json" for r in range(self.nproc)]
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in results):
            late = time.monotonic() > deadline
            if self.proc.poll() is not None or late:
                what = f"timed out after {timeout:.0f} s" if late else f"exit {self.proc.returncode}"
                self.stop()
                _WORKERS.pop(self.nproc, None)
                pytest.fail(f"the {self.nproc}-process test workers running {', '.join(modules)} "
                            f"stopped ({what}):\n{self.log(start)[-6000:]}")
            time.sleep(0.02)
        return [json.loads(p.read_text()) for p in results], self.log(start)

    def stop(self) -> None:
        if self.proc.poll() is None:
            ask = self.dir / f".request{self.requests}.json"
            ask.write_text('{"stop": true}')
            ask.rename(self.dir / f"request{self.requests}.json")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # torchrun and its workers
                self.proc.wait()


_WORKERS: dict[int, Workers] = {}


def _workers(nproc: int) -> Workers:
    if nproc not in _WORKERS:
        _WORKERS[nproc] = Workers(nproc)
    return _WORKERS[nproc]


@atexit.register
def _stop_workers() -> None:
    for workers in list(_WORKERS.values()):
        workers.stop()
