"""The container images and their one install path, checked where no image can be built: both
Dockerfiles install through docker/install.sh (what `make install`, so CI, runs), the GPU image
never installs a torch of its own, and the checks the images' builds rely on (the base-package
pins, moue-env's version ranges) fail when they should."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from parallel import environment

ROOT = Path(__file__).resolve().parents[1]
GPU, CPU = ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"
STAND_IN = ROOT / "docker" / "stand-in" / "Dockerfile.ngc"  # NGC's layout, for make test-images
# Anything that installs Python packages: in an image it may only happen inside install.sh.
PACKAGE_INSTALLERS = re.compile(r"\b(pip3?|conda|mamba|uv|easy_install|micromamba)\b")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in
            (re.match(r"(\w+)\s+(.*)", line.strip()) for line in joined.splitlines()) if m]


def build_args(path: Path) -> dict[str, str]:
    """Each ARG's default, quotes removed."""
    return {k: v.strip('"') for k, v in (a.split("=", 1) for op, a in instructions(path)
                                         if op == "ARG" and "=" in a)}


def runs(path: Path) -> list[str]:
    return [args for op, args in instructions(path) if op == "RUN"]


def test_gpu_image_installs_only_through_the_install_script_and_keeps_the_base_torch():
    installs = [r for r in runs(GPU) if "docker/install.sh" in r]
    assert len(installs) == 1, runs(GPU)
    for flag in ("--system-site-packages", "--base-torch", '${REQUIRE:+--require "$REQUIRE"}'):
        assert flag in installs[0]
    # The requirement holds unless a build on a stand-in base turns it off (make test-images).
    assert build_args(GPU)["REQUIRE"] == "transformer_engine,apex"
    assert not any(PACKAGE_INSTALLERS.search(r) for r in runs(GPU))
    # Nothing hands the script a torch to install.
    assert not re.search(r"\bTORCH(_INDEX_URL)?=", GPU.read_text())


def test_cpu_image_installs_as_make_install_does_with_the_cpu_torch():
    assert "make install" in runs(CPU)
    assert not any(PACKAGE_INSTALLERS.search(r) for r in runs(CPU))
    args = build_args(CPU)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH"] == "torch==2.13.0"
    recipe = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert "docker/install.sh --venv .venv" in recipe, recipe


def test_images_are_pinned_and_run_as_a_non_root_user():
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch(:\d\d\.\d\d-py3|@sha256:[0-9a-f]{64})",
                        build_args(GPU)["BASE"]), build_args(GPU)["BASE"]
    assert ("FROM", "${BASE}") in instructions(GPU)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", build_args(CPU)["BASE"])
    assert ("FROM", "${BASE} AS runtime") in instructions(CPU)
    for path in (GPU, CPU):
        ops = instructions(path)
        users = [i for i, (op, _) in enumerate(ops) if op == "USER"]
        install = next(i for i, (op, a) in enumerate(ops) if op == "RUN" and "install" in a
                       and "useradd" not in a)
        assert users and users[0] < install, path  # the install runs as the user, too
        assert ops[users[-1]][1].split(":")[0] not in ("root", "0"), path


def test_cpu_image_is_tagged_only_once_its_smoke_stage_has_passed():
    stages = [a for op, a in instructions(CPU) if op == "FROM"]
    assert stages == ["${BASE} AS runtime", "runtime AS smoke", "runtime"], stages
    assert "docker/smoke.sh runs/smoke" in runs(CPU)
    # The last stage copies the smoke stage's mark: building the image builds that stage first.
    copies = [a for op, a in instructions(CPU) if op == "COPY" and "--from=smoke" in a]
    assert copies and "runs/smoke/passed" in copies[0]
    assert 'echo "smoke passed" > "$out/passed"' in (ROOT / "docker" / "smoke.sh").read_text()


def test_dockerignore_keeps_environments_and_runs_out_of_the_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv*", "runs"):
        assert entry in ignored


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e .[dev])")
    proc = subprocess.run([hadolint, str(GPU), str(CPU), str(STAND_IN)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_install_script_refuses_to_install_a_torch_where_the_base_must_bring_it(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = subprocess.run([str(ROOT / "docker" / "install.sh"), "--venv", str(venv),
                           "--base-torch"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "torch does not import" in proc.stderr and "NGC PyTorch" in proc.stderr
    assert not (venv / "base-packages.txt").exists()  # it stopped before anything was installed
    bad = subprocess.run([str(ROOT / "docker" / "install.sh"), "--extra", "dev"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--extra'" in bad.stderr


def test_install_script_keeps_the_base_torch_and_installs_only_the_project(tmp_path):
    """The GPU image's install path: the venv sees a base's packages (here this environment's,
    through PYTHONPATH, as NGC's dist-packages are seen through --system-site-packages), pins
    their torch, installs nothing but the project, and checks the result with moue-env."""
    venv, base = tmp_path / "venv", sysconfig.get_paths()["purelib"]
    proc = subprocess.run([str(ROOT / "docker" / "install.sh"), "--venv", str(venv),
                           "--system-site-packages", "--base-torch", "--extras", ""],
                          env={**os.environ, "PYTHONPATH": base}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"keeping torch {torch.__version__}" in proc.stdout
    assert f"torch=={torch.__version__}" in (venv / "base-packages.txt").read_text()
    installed = {p.name.split("-")[0] for p in venv.glob("lib/python*/site-packages/*.dist-info")}
    assert installed == {"moue"}, installed
    assert "default_plan: transformer_impl=" in proc.stdout  # moue-env ran, and passed
    assert (venv / ".installed").exists()


def test_base_package_pins_hold_torch_and_catch_a_replacement(tmp_path):
    for name in ("torch", "nvidia-cublas-cu12", "transformer-engine-torch", "apex", "triton",
                 "flash-attn"):
        assert environment.BASE_PACKAGES.match(name), name
    for name in ("numpy", "torchmetrics", "megatron-core", "transformers"):
        assert not environment.BASE_PACKAGES.match(name), name
    pins = tmp_path / "pins.txt"
    assert environment.pin(str(pins))["torch"] == torch.__version__
    assert f"torch=={torch.__version__}\n" in pins.read_text()
    assert environment.changed_pins(str(pins)) == []
    pins.write_text(pins.read_text().replace(f"torch=={torch.__version__}", "torch==2.10.0a0"))
    assert environment.changed_pins(str(pins)) == [f"torch: 2.10.0a0 -> {torch.__version__}"]


def test_moue_env_names_versions_outside_the_supported_ranges(monkeypatch):
    assert environment.problems() == []  # this environment, as make install built it
    real = environment.installed_version
    versions = {"transformer-engine": "2.13.0", "torch": "2.10.0a0+b4e4ee81d3.nv25.12"}
    monkeypatch.setattr(environment, "installed_version", lambda d: versions.get(d, real(d)))
    monkeypatch.setattr(environment, "_imports", lambda module: None)
    found = environment.problems()
    # An NGC pre-release torch lies inside >=2.6,<3; a Transformer Engine past megatron-core
    # 0.16.1's range (>=2.9,<2.12) is named with the range and the fix (0.19 declares none).
    assert not any(p.startswith("torch") for p in found), found
    te_range = environment.declared_range("megatron-core", "transformer-engine")
    if te_range is None:
        assert found == []
    else:
        assert len(found) == 1 and "Transformer Engine 2.13.0 is outside" in found[0]
        assert str(te_range) in found[0] and "NGC PyTorch tag" in found[0]
    versions["megatron-core"] = "0.15.0"
    assert any(p.startswith("megatron-core 0.15.0 is outside") and "MCORE=" in p
               for p in environment.problems())


def test_moue_env_requires_what_the_gpu_image_must_bring(capsys):
    assert environment.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__ and info["problems"] == []
    assert info["default_plan"]["transformer_impl"] == ("transformer_engine" if
                                                        environment.report()["machine"]["cuda"]
                                                        and info["versions"]["transformer-engine"]
                                                        else "local")
    if environment.installed_version("apex") is None:
        assert environment.main(["--require", "apex"]) == 1
        assert "apex does not import" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        environment.main(["--require", "te"])
    assert exit_.value.code == 2
    assert "te: not a requirable package; choose from transformer_engine, apex" in \
        capsys.readouterr().err
