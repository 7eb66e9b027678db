"""The software a process runs with, against what moue supports; and the install's base pins.

``moue-env`` prints the versions (Python, torch and its CUDA build, megatron-core, Transformer
Engine, apex), the machine's capabilities and the plan a run gets here by default. With
``--require transformer_engine,apex`` (the GPU image's build runs that) it exits 1 when a
required package does not import or any version lies outside its supported range, naming the
package, the version, the range and the fix.

Supported ranges are read from the installed packages' own metadata, not copied here: torch and
megatron-core from moue's requirements (pyproject.toml), Transformer Engine from the range the
installed megatron-core declares for it (0.16.1: ``>=2.9,<2.12``; 0.19 declares none).
Pre-releases count as inside a range: NGC images ship torch builds such as ``2.10.0a0+...``.

``python -m parallel.environment pin FILE`` / ``verify FILE`` are the two install steps of
``docker/install.sh`` (standard library only: they run before the project's dependencies are
installed). ``pin`` writes ``name==version`` of each installed base package (torch, Transformer
Engine, apex, NVIDIA's CUDA libraries, Triton, flash-attn) as pip constraints, so installing the
project can never replace them (in the GPU image: NGC's builds, linked against its CUDA and
NCCL); ``verify`` fails if any of them changed anyway.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import platform
import re
import sys
import warnings

# Base packages an install must never replace: the framework, its kernels and CUDA libraries.
BASE_PACKAGES = re.compile(
    r"^(torch|torchvision|triton|pytorch-triton|apex|transformer-engine(-.+)?|nvidia-.+|"
    r"flash-attn(-.+)?|cudnn.*|nccl.*)$")
REQUIRABLE = ("transformer_engine", "apex")
GPU_IMAGE_FIX = "use the GPU image (docker/Dockerfile) or its NGC PyTorch base"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_packages() -> dict[str, str]:
    """Installed base packages (normalized name -> version), first on sys.path winning, as
    Python imports them (a venv's own copy before the base image's)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _normalized(dist.metadata["Name"] or "")
        if BASE_PACKAGES.match(name) and name not in found:
            found[name] = dist.version
    return found


def pin(path: str) -> dict[str, str]:
    pins = base_packages()
    with open(path, "w") as f:
        f.write("# Written by docker/install.sh: the base packages this install must keep.\n")
        f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    return pins


def changed_pins(path: str) -> list[str]:
    """``name: old -> new`` for each pinned package the install replaced or removed."""
    now = base_packages()
    changes = []
    with open(path) as f:
        for line in f:
            if "==" not in line or line.startswith("#"):
                continue
            name, version = line.strip().split("==", 1)
            if now.get(name) != version:
                changes.append(f"{name}: {version} -> {now.get(name, 'removed')}")
    return changes


# --- supported versions ---------------------------------------------------------------------

def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def declared_range(dist: str, requirement: str):
    """The specifier ``dist`` declares for ``requirement`` (in any extra), or None."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return None
    specs = [Requirement(r).specifier for r in requires
             if _normalized(Requirement(r).name) == _normalized(requirement)]
    specs = [s for s in specs if str(s)]
    return SpecifierSet(",".join(str(s) for s in specs)) if specs else None


def _outside(version: str, spec) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return not spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True


def _imports(module: str) -> str | None:
    """None when ``module`` imports, else the error in one line."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken extension raises OSError / RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def problems(require: tuple[str, ...] = ()) -> list[str]:
    """Each way this environment falls outside what moue supports, with the fix."""
    found = []
    ranges = {"torch": declared_range("moue", "torch"),
              "megatron-core": declared_range("moue", "megatron-core")}
    for dist, module in (("torch", "torch"), ("megatron-core", "megatron.core")):
        version = installed_version(dist)
        if version is None:
            found.append(f"{dist} is not installed; run `make install` (docker/install.sh)")
            continue
        if ranges[dist] is not None and _outside(version, ranges[dist]):
            fix = (f"reinstall with MCORE='{dist}{ranges[dist]}' docker/install.sh"
                   if dist == "megatron-core" else f"{GPU_IMAGE_FIX}, or a torch inside it")
            found.append(f"{dist} {version} is outside the range moue supports "
                         f"({ranges[dist]}); {fix}")
        elif error := _imports(module):
            found.append(f"{module} does not import ({error}); reinstall {dist}")
    te_version = installed_version("transformer-engine") or installed_version(
        "transformer-engine-torch")
    if "transformer_engine" in require or te_version is not None:
        if te_version is None:
            found.append(f"Transformer Engine is not installed; {GPU_IMAGE_FIX}")
        elif error := _imports("transformer_engine.pytorch"):
            found.append(f"transformer_engine.pytorch does not import ({error}); {GPU_IMAGE_FIX}")
        elif (te_range := declared_range("megatron-core", "transformer-engine")) is not None \
                and _outside(te_version, te_range):
            found.append(f"Transformer Engine {te_version} is outside the range megatron-core "
                         f"{installed_version('megatron-core')} declares ({te_range}); choose "
                         "an NGC PyTorch tag whose Transformer Engine lies inside it, or a "
                         "megatron-core release that supports this one (MCORE=...)")
    if "apex" in require:
        if error := _imports("apex"):
            found.append(f"apex does not import ({error}); {GPU_IMAGE_FIX} (never the PyPI "
                         "package named apex: it is unrelated)")
        elif importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
            found.append("apex is installed without its fused_weight_gradient_mlp_cuda extension "
                         "(gradient-accumulation fusion); " + GPU_IMAGE_FIX)
    return found


def report() -> dict:
    """Versions, the machine's capabilities and the default plan, as one JSON-able dict."""
    import torch

    from parallel.capability import Capabilities, plan

    caps = Capabilities.detect()
    default = plan(caps, transformer_impl="auto", expert_impl="auto", precision="auto",
                   fp8_recipe="tensorwise", has_experts=True)
    return {
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "megatron-core": installed_version("megatron-core"),
                     "transformer-engine": caps.te_version, "apex": installed_version("apex")},
        "supported": {"torch": str(declared_range("moue", "torch")),
                      "megatron-core": str(declared_range("moue", "megatron-core")),
                      "transformer-engine": str(declared_range("megatron-core",
                                                               "transformer-engine"))},
        "machine": {"cuda": caps.cuda, "device": caps.device_name,
                    "compute_capability": caps.compute_capability,
                    "fp8_recipes": list(caps.fp8_recipes())},
        "default_plan": default.describe(),
    }


def _require_list(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in REQUIRABLE]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{','.join(unknown)}: not a requirable package; choose from {', '.join(REQUIRABLE)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moue-env",
        description="What this machine and its software run: versions against the ranges moue "
                    "supports, the machine's capabilities and the plan a run gets by default. "
                    "Exits 1, naming each problem and its fix, when something is outside them.",
        epilog="examples:\n  moue-env\n  moue-env --require transformer_engine,apex   "
               "# what the GPU image's build checks",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--require", type=_require_list, default=(),
                        help=f"comma-separated packages that must import: {', '.join(REQUIRABLE)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # Megatron-Core announces its fallbacks where Transformer Engine / apex are absent.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    found = problems(args.require)
    info = {**report(), "problems": found}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"python: {info['python']}")
        for section in ("versions", "supported", "machine", "default_plan"):
            print(f"{section}: " + ", ".join(f"{k}={v}" for k, v in info[section].items()))
        for problem in found:
            print(f"moue-env: {problem}", file=sys.stderr)
    return 1 if found else 0


def _install_step(argv: list[str]) -> int:
    """``pin FILE`` / ``verify FILE``: docker/install.sh's steps around the project install."""
    if len(argv) != 2 or argv[0] not in ("pin", "verify"):
        print("usage: python -m parallel.environment pin|verify FILE", file=sys.stderr)
        return 2
    if argv[0] == "pin":
        pins = pin(argv[1])
        print("install.sh: keeping " + (", ".join(f"{n} {v}" for n, v in sorted(pins.items())
                                                  if not n.startswith("nvidia-")) or "nothing"))
        return 0
    changes = changed_pins(argv[1])
    for change in changes:
        print(f"install.sh: the install replaced a base package ({change}); the base's build "
              "must stay (it is linked against the image's CUDA and NCCL). Find the requirement "
              "that asked for another version (pip install --dry-run --report) and relax it.",
              file=sys.stderr)
    return 1 if changes else 0


if __name__ == "__main__":
    sys.exit(_install_step(sys.argv[1:]))
