# moue - developer commands. `make test` on a fresh machine installs everything it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without torch, install this build first: with torch already present, the
# project's torch range is satisfied and pip never pulls a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0
# The newest Megatron-Core line (0.19.x declares Python>=3.12; it runs on 3.11 and is checked here).
COMPAT_VENV ?= .venv-mc019
COMPAT_MCORE ?= megatron-core>=0.19,<0.20

# Extras of `make install`; the container images pass their own to docker/install.sh.
EXTRAS ?= dev,mpi
# make image / image-cpu: the first container engine that answers (else the first installed, so
# the error names it; found once), and the image name.
ENGINE ?= $(eval ENGINE := $(shell for e in docker podman; do p=$$(command -v $$e) && $$p info \
	>/dev/null 2>&1 && { echo $$p; exit; }; done; command -v docker || command -v podman))$(ENGINE)
IMAGE ?= moue
# More flags for the engine's build (podman where no OCI runtime works: --isolation=chroot), the
# image's base (unset: the Dockerfile's own; docker/stand-in/ makes local stand-ins), and for the
# CPU image a directory holding a CPU wheel of torch, mounted into the build where PyTorch's CPU
# index cannot be reached (podman and buildah only). docs/containers.md.
BUILD_FLAGS ?=
BASE ?=
TORCH_WHEELS ?=
# A CA bundle for pip inside the build, where a TLS-inspecting proxy stands between the build and
# PyPI (podman and buildah: mounted; the Dockerfiles' PIP_CERT).
CA_BUNDLE ?=
# The wheel of the pinned release for the CPU image's Python (3.11; docker/Dockerfile.cpu).
torch_wheel = $(firstword $(wildcard $(TORCH_WHEELS)/torch-$(subst torch==,,$(TORCH))+cpu-cp311-*.whl))
build_args = $(BUILD_FLAGS) $(if $(BASE),--build-arg BASE=$(BASE)) $(if $(TORCH_WHEELS),-v \
	$(abspath $(TORCH_WHEELS)):/wheels:ro --build-arg TORCH_INDEX_URL= \
	--build-arg TORCH=/wheels/$(notdir $(torch_wheel))) $(if $(CA_BUNDLE),-v \
	$(abspath $(CA_BUNDLE)):/run/build-ca.crt:ro --build-arg PIP_CERT=/run/build-ca.crt)

.PHONY: install test test-slow test-compat test-gpu test-images lint demo clean image image-cpu

DEMO ?= runs/demo
DEMO_ARGS ?=
CPU_RUN := CUDA_VISIBLE_DEVICES= TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1

install: $(VENV)/.installed

# The one install path (docker/install.sh), which CI and both container images run too: the
# venv, torch only where none imports, then the project with the installed torch pinned.
$(VENV)/.installed: pyproject.toml docker/install.sh
	PYTHON=$(PYTHON) TORCH="$(TORCH)" docker/install.sh --venv $(VENV) --extras "$(EXTRAS)"

# Every feature, in minutes (docs/testing.md); `slow` tests (the benchmarks' smoke runs) are left to
# `make test-slow`, which CI runs as well, and `images` tests (image builds) to `make test-images`.
test: install
	$(PY) -m pytest -q --durations=20 -m "not slow and not images"

test-slow: install
	$(PY) -m pytest -q --durations=10 -m "slow and not gpu"

# The GPU tests (marker `gpu`) on this machine's CUDA GPUs with NCCL: one GPU, and two where
# present. Run it in the GPU image (docker/), whose PyTorch brings CUDA and Transformer Engine.
test-gpu: install
	$(PY) -m pytest -q -m gpu -rs

# The compatibility subset (tests marked `compat`) against megatron-core 0.19.x. Its dependencies
# are installed first and megatron-core with --no-deps, so --ignore-requires-python touches
# nothing else (it would otherwise pick a numpy that needs Python 3.12).
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -m compat

$(COMPAT_VENV)/.installed: pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPAT_VENV)/bin/python -m pip install "$(TORCH)"
	$(COMPAT_VENV)/bin/python -m pip install "numpy<2.5" packaging tensorboard pyyaml tqdm psutil "tokenizers>=0.20" "sentencepiece>=0.2" "safetensors>=0.4" matplotlib "pytest>=8"
	$(COMPAT_VENV)/bin/python -m pip install --no-deps --ignore-requires-python "$(COMPAT_MCORE)"
	$(COMPAT_VENV)/bin/python -m pip install --no-deps -e .
	touch $@

# Train a small rotational MoUE (EP=2) elastically on 2 CPU processes, on this Python's standard
# library; then `.venv/bin/moue-eval --load runs/demo/checkpoints --family` prints its family.
demo: install
	test -f $(DEMO)/corpus/train.jsonl || $(VENV)/bin/moue-build-corpus --output $(DEMO)/corpus
	$(VENV)/bin/moue-preprocess --input $(DEMO)/corpus/train.jsonl --output-prefix $(DEMO)/data/stdlib \
		--tokenizer byte --append-eod --overwrite --quiet
	$(CPU_RUN) $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m moue.cli \
		--config examples/configs/tiny_cpu.yaml data.mock=false data.path=$(DEMO)/data/stdlib \
		data.tokenizer=byte logging.dir=$(DEMO) checkpoint.dir=$(DEMO)/checkpoints \
		checkpoint.interval=200 elastic.enabled=true $(DEMO_ARGS)
	@$(PY) -m moue.training.metrics $(DEMO)

lint: install
	$(PY) -m ruff check moue parallel data_tools tests benchmarks
	$(VENV)/bin/shellcheck -x examples/scripts/*.sh examples/scripts/*.sbatch .ci/run tests/stubs/* docker/*.sh docker/stand-in/*.sh benchmarks/*.sh
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu docker/stand-in/Dockerfile.ngc

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info .pytest_cache .ruff_cache

# Container images (docs/containers.md): the GPU image on NGC PyTorch, and the CPU image.
image:
	@$(call need_engine,$@)
	$(ENGINE) build $(build_args) -f docker/Dockerfile -t $(IMAGE):gpu .

# Ends with the smoke stage (docker/smoke.sh): the image is tagged only if it passes.
image-cpu:
	@$(call need_engine,$@)
	@test -z "$(TORCH_WHEELS)" -o -n "$(torch_wheel)" || { echo "make $@: TORCH_WHEELS=$(TORCH_WHEELS) \
	holds no CPU wheel of $(TORCH) for Python 3.11 (torch-$(subst torch==,,$(TORCH))+cpu-cp311-*.whl); \
	download one (pip download --no-deps $(TORCH) --python-version 3.11 --only-binary=:all: \
	--index-url https://download.pytorch.org/whl/cpu -d DIR) or drop TORCH_WHEELS"; exit 2; }
	$(ENGINE) build $(build_args) -f docker/Dockerfile.cpu -t $(IMAGE):cpu .

# Builds both images on local stand-in bases (docker/stand-in/; root, podman and debootstrap):
# the CPU image with its smoke stage, and the GPU image's own steps up to its requirement check.
test-images: install
	MOUE_IMAGE_TESTS=1 $(PY) -m pytest -q -m images -rs --durations=0

need_engine = test -z "$(TORCH_WHEELS)$(CA_BUNDLE)" -o "$(notdir $(ENGINE))" != docker || { \
	echo "make $(1): TORCH_WHEELS and CA_BUNDLE mount into the build, which docker build cannot \
	do; use ENGINE=podman (or buildah), or drop them"; exit 2; }; \
	test -n "$(ENGINE)" || { echo "make $(1): no container engine (docker or podman) \
	on this machine. Build on one that has one, or pass ENGINE=/path/to/engine; \
	docs/containers.md says how to build and run the images."; exit 1; }; \
	$(ENGINE) info >/dev/null 2>&1 || { echo "make $(1): $(ENGINE) is installed but cannot \
	reach its daemon (is it running, and may this user use it?); docs/containers.md"; exit 1; }
