"""Both container images built, not only parsed (`make test-images`, marker `images`): the CPU
image on a Debian stand-in base with its smoke stage, and the GPU image's own steps on a stand-in
that lays Python packages out as NGC PyTorch does (torch in the system site-packages, no
Transformer Engine, no apex) - so the build must stop at its requirement check, and build without
it. Needs root, podman and debootstrap (docker/stand-in/base.sh); about 15 minutes the first
time, less once the stand-in bases exist."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.images

ROOT = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
BASE = "localhost/moue-stand-in:bookworm-python3.11"
NGC = "localhost/moue-stand-in:ngc"
TAG = "localhost/moue-test"  # make's IMAGE: the images are TAG:cpu and TAG:gpu
# Every build step runs in a chroot: the OCI runtimes cannot set up a container on every machine.
ISOLATION = "--isolation=chroot"
TIMEOUT = 3600

# Opt-in (make test-images sets it): a bare `pytest` as root on a host with podman would
# otherwise start a quarter of an hour of builds.
missing = [why for why, absent in (
    ("MOUE_IMAGE_TESTS=1 (make test-images)", os.environ.get("MOUE_IMAGE_TESTS") != "1"),
    ("podman (apt-get install podman)", PODMAN is None),
    ("debootstrap (apt-get install debootstrap)", shutil.which("debootstrap") is None),
    ("root (debootstrap)", os.geteuid() != 0)) if absent]
if missing:
    pytestmark = [pytestmark, pytest.mark.skip(reason="needs " + ", ".join(missing))]


def torch_wheels() -> str | None:
    """A directory holding a CPU wheel of this torch (TORCH_WHEELS, else pip's find-links), for
    builds where PyTorch's CPU index cannot be reached; None: the images use that index."""
    dirs = [os.environ.get("TORCH_WHEELS", "")] + os.environ.get("PIP_FIND_LINKS", "").split()
    version = torch.__version__.split("+")[0]
    for d in filter(None, dirs):
        if list(Path(d).glob(f"torch-{version}+cpu-*.whl")):
            return d
    return None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    proc.output = proc.stdout + proc.stderr
    return proc


# This machine's CA bundle for pip (a TLS-inspecting proxy may stand between it and PyPI).
CA_BUNDLE = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")


def make_image(target: str, base: str, *flags: str) -> subprocess.CompletedProcess:
    wheels = torch_wheels()
    return run(["make", target, f"ENGINE={PODMAN}", f"IMAGE={TAG}", f"BASE={base}",
                "BUILD_FLAGS=" + " ".join((ISOLATION, *flags)),
                *([f"TORCH_WHEELS={wheels}"] if wheels and target == "image-cpu" else []),
                *([f"CA_BUNDLE={CA_BUNDLE}"] if CA_BUNDLE else [])])


def in_image(image: str, command: str) -> subprocess.CompletedProcess:
    """`command` run in `image` as a build step (`podman run` needs more of the kernel than a
    chroot build does, and fails on some machines: setrlimit)."""
    return run([PODMAN, "build", ISOLATION, "--no-cache", "-f", "-", str(ROOT / "docker")],
               input=f"FROM {image}\nRUN {command}\n")


def tail(proc) -> str:
    return proc.output[-6000:]


@pytest.fixture(scope="module")
def stand_in_base():
    proc = run(["docker/stand-in/base.sh", BASE], env={**os.environ, "ENGINE": PODMAN})
    assert proc.returncode == 0, tail(proc)
    return BASE


@pytest.fixture(scope="module")
def ngc_stand_in(stand_in_base):
    wheels = torch_wheels()
    wheels = wheels and os.path.abspath(wheels)  # podman refuses relative volume sources
    wheel = [f"-v={wheels}:/wheels:ro", "--build-arg=TORCH_INDEX_URL=",
             "--build-arg=TORCH=/wheels/" + next(Path(wheels).glob(
                 f"torch-{torch.__version__.split('+')[0]}+cpu-*.whl")).name] if wheels else []
    ca = [f"-v={CA_BUNDLE}:/run/build-ca.crt:ro", "--build-arg=PIP_CERT=/run/build-ca.crt"] \
        if CA_BUNDLE else []
    proc = run([PODMAN, "build", ISOLATION, *wheel, *ca, f"--build-arg=BASE={stand_in_base}",
                "-f", "docker/stand-in/Dockerfile.ngc", "-t", NGC, "."])
    assert proc.returncode == 0, tail(proc)
    return NGC


def test_cpu_image_builds_on_the_stand_in_base_and_passes_its_smoke_stage(stand_in_base):
    proc = make_image("image-cpu", stand_in_base)
    assert proc.returncode == 0, tail(proc)
    for step in ("moue-env", "dry run", "20 steps on 2 processes", "moue-eval of the checkpoint"):
        # A rebuild of an unchanged context takes the smoke step from the layer cache, silently.
        assert f"== smoke: {step} passed" in proc.output or "Using cache" in proc.output, tail(proc)
    # The tagged image is the runtime stage plus the smoke stage's mark, and its torch is the CPU
    # build of this checkout's release.
    check = in_image(f"{TAG}:cpu", "cat runs/smoke-passed && python -c "
                     "'import torch, moue; print(torch.__version__, torch.version.cuda)'")
    assert check.returncode == 0, tail(check)
    assert "smoke passed" in check.output
    assert f"{torch.__version__.split('+')[0]}+cpu None" in check.output, tail(check)


def test_gpu_image_stops_at_its_requirement_check_on_a_base_without_transformer_engine(
        ngc_stand_in):
    proc = make_image("image", ngc_stand_in)
    assert proc.returncode != 0, tail(proc)
    # Every step before the check ran: the base's torch pinned and kept, the project installed.
    assert "install.sh: keeping torch" in proc.output, tail(proc)
    assert "Successfully installed" in proc.output and "megatron-core-0.16.1" in proc.output
    assert "moue-env: Transformer Engine is not installed" in proc.output, tail(proc)
    assert "moue-env: apex does not import" in proc.output, tail(proc)


def test_gpu_image_builds_without_the_requirement_and_moue_env_runs_inside(ngc_stand_in):
    proc = make_image("image", ngc_stand_in, "--build-arg=REQUIRE=")
    assert proc.returncode == 0, tail(proc)
    check = in_image(f"{TAG}:gpu", "echo JSON && moue-env --json && echo END && "
                     "python -c 'import torch; print(\"torch from\", torch.__file__)'")
    assert check.returncode == 0, tail(check)
    text = check.output
    info = json.loads(text[text.index("JSON\n") + 5:text.index("\nEND")])
    assert info["problems"] == [] and info["versions"]["transformer-engine"] is None
    assert info["versions"]["megatron-core"] == "0.16.1"
    # torch is the base's, in the system site-packages, as NGC's is; the venv holds only moue.
    assert "torch from /usr/local/lib/python3" in text and "dist-packages/torch" in text
