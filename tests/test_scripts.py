"""The launch scripts of examples/scripts as users run them: shellcheck-clean, the CPU script in
a fresh shell, and the SLURM script under a stubbed srun (tests/stubs), with overrides passed
word for word and the SIGTERM-then-resume path ending in exit 0."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples" / "scripts").glob("*.sh")) + sorted(
    (ROOT / "examples" / "scripts").glob("*.sbatch"))
SHORT = ["train.warmup_steps=1", "train.eval_interval=0", "model.seq_length=64",
         "train.global_batch_size=8", "train.micro_batch_size=2"]


def _clean_env(**extra) -> dict:
    """The environment of a fresh shell: no launcher variables, no active virtual env."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                         "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.update(CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _terminal_signals() -> None:
    """SIGINT at its default in the child, as a terminal's shell has it. A shell cannot trap a
    signal that was ignored when it started, and pytest runs with SIGINT ignored whenever it was
    started as a background job of a non-interactive shell (``make test &``, as CI harnesses do:
    POSIX shells start asynchronous commands so): the script would then never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _steps(log_dir: Path) -> list[int]:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e .[dev])")
    scripts = [*SCRIPTS, ROOT / ".ci" / "run", *sorted((ROOT / "tests" / "stubs").iterdir()),
               *sorted((ROOT / "docker").glob("**/*.sh"))]
    proc = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_cpu_script_runs_in_a_fresh_shell_and_stops_cleanly_on_ctrl_c(tmp_path):
    """No activated venv and no torchrun on PATH: the script finds the project's Python. SIGINT
    to the script's process group (Ctrl-C in a terminal) saves a checkpoint, and the script
    exits 0 although torchrun exits 1 after forwarding a signal."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv here (made by make install)")
    run_dir = tmp_path / "run"
    script = subprocess.Popen(
        ["bash", "examples/scripts/train_cpu_2proc.sh", "train.steps=500", *SHORT,
         f"logging.dir={run_dir}", f"checkpoint.dir={run_dir / 'ckpt'}"],
        cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_terminal_signals)
    deadline = time.time() + 240
    while len(_steps(run_dir)) < 2 and time.time() < deadline and script.poll() is None:
        time.sleep(0.1)
    assert script.poll() is None, script.communicate()[1][-3000:]
    os.killpg(script.pid, signal.SIGINT)
    out, err = script.communicate(timeout=240)
    assert script.returncode == 0, err[-3000:]
    stopped = max(_steps(run_dir))
    assert f"moue: stopped by signal after step {stopped}; checkpoint saved" in err
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{stopped:07d}"


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    from data_tools.corpus import build_stdlib_corpus
    from data_tools.preprocess import preprocess

    base = tmp_path_factory.mktemp("slurm-data")
    corpus = build_stdlib_corpus(base / "corpus", limit_bytes=1_000_000)
    preprocess([str(corpus.train)], str(base / "stdlib"), "byte", append_eod=True, progress=False)
    return base / "stdlib"


def _sbatch(tmp_path, dataset, steps, wait=True):
    run_dir = tmp_path / "my run"  # a space: re-splitting would break it in two
    cmd = ["bash", "examples/scripts/train_slurm.sbatch", "examples/configs/tiny_cpu.yaml",
           f"logging.dir={run_dir}", f"data.blend=[1.0, {dataset}]", "data.mock=false",
           f"checkpoint.dir={run_dir / 'ckpt'}", f"train.steps={steps}", *SHORT]
    env = _clean_env(PATH=f"{ROOT / 'tests' / 'stubs'}:/usr/local/bin:/usr/bin:/bin",
                     SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[01-02]", PYTHON=sys.executable,
                     MASTER_PORT=str(_free_port()))
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_slurm_script_passes_overrides_and_a_sigterm_stop_resumes_with_exit_zero(
        tmp_path, byte_dataset):
    """SLURM's --signal=TERM reaches every task: the tasks save a checkpoint and exit 0, so the
    job (here: the script) ends with 0; the same command resumes from the checkpoint."""
    job = _sbatch(tmp_path, byte_dataset, steps=500, wait=False)
    run_dir, deadline = tmp_path / "my run", time.time() + 240
    while len(_steps(run_dir)) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert job.poll() is None, job.communicate()[1][-3000:]
    tasks = [p for p in psutil.Process(job.pid).children(recursive=True)
             if p.cmdline()[1:3] == ["-m", "moue.cli"]]
    assert len(tasks) == 2
    for task in tasks:  # what SLURM's --signal=TERM@300 does
        task.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=240)
    assert job.returncode == 0, err[-3000:]
    assert "stopped by signal after step" in out + err
    stopped = max(_steps(run_dir))
    assert stopped < 500
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{stopped:07d}"
    again = _sbatch(tmp_path, byte_dataset, steps=stopped + 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(run_dir) == list(range(1, stopped + 3))  # resumed: each step once


@pytest.mark.parametrize("image, runtime_args", [
    ("registry.example.com#team/moue:gpu",
     ["--container-image=registry.example.com#team/moue:gpu", "--container-workdir=/opt/moue"]),
    ("/images/moue gpu.sif", ["apptainer exec --nv --bind", "--pwd /opt/moue /images/moue gpu.sif"]),
])
def test_container_slurm_script_starts_each_task_in_the_image_with_the_overrides(
        tmp_path, image, runtime_args):
    """pyxis (a registry image) or Apptainer (a .sif file): srun runs the image's Python in the
    container with the mounts, and the overrides arrive word for word (a dry run: no training)."""
    log, mounts = tmp_path / "stub.log", f"{tmp_path / 'my data'}:/data,{tmp_path / 'runs'}:/runs"
    env = _clean_env(PATH=f"{ROOT / 'tests' / 'stubs'}:/usr/local/bin:/usr/bin:/bin",
                     SLURM_NTASKS="1", SLURM_JOB_NODELIST="node01", PYTHON=sys.executable,
                     IMAGE=image, MOUNTS=mounts, STUB_LOG=str(log))
    proc = subprocess.run(["bash", "examples/scripts/train_slurm_container.sbatch",
                           "examples/configs/tiny_cpu.yaml", "logging.dir=/runs/my run",
                           "moe.window=4", "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 'logging.dir=/runs/my run' split in two would be refused ("run" is no key=value).
    assert json.loads(proc.stdout)["window"] == 4
    calls = log.read_text()
    assert f"--container-mounts={mounts}" in calls or f"--bind {mounts}" in calls
    for expected in runtime_args:
        assert expected in calls, calls
    assert (tmp_path / "my data").is_dir() and (tmp_path / "runs").is_dir()  # host mount points
