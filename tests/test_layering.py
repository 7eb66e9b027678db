"""The product's packages import only downwards (docs/architecture.md, "Layers"): every import in
moue/, parallel/ and data_tools/, at module level or inside a function, is read from the source
and checked against the layer order."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("moue", "parallel", "data_tools")
# Lowest first; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("parallel",),
    ("data_tools",),
    ("moue", "moue.sections", "moue.outputs"),
    # what the config sections are made of: names and rules they validate against
    ("moue.elastic.config", "moue.model.registry", "moue.model.topology", "moue.model.balance",
     "moue.model.recompute"),
    ("moue.config",),
    ("moue.checkpoint",),
    ("moue.model",),
    ("moue.elastic",),
    ("moue.run_check", "moue.dry_run"),
    ("moue.training",),
    ("moue.commands", "moue.convert", "moue.cli"),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every product module ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            # ``from moue import checkpoint`` imports the module moue.checkpoint
            names += [f"{node.module}.{a.name}" for a in node.names
                      if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()
                      or (ROOT / node.module.replace(".", "/") / a.name).is_dir()]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PRODUCT]
    return found


def test_no_package_imports_one_above_it():
    upward = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = module_name(path)
            for line, imported in imports(path):
                if layer_of(imported) > layer_of(module):
                    upward.append(f"{path.relative_to(ROOT)}:{line} {module} imports {imported}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_rule_sees_an_upward_import(tmp_path):
    """The check itself: a model module importing the training system is caught."""
    assert layer_of("moue.training.trainer") > layer_of("moue.model.router")
    assert layer_of("moue.model.topology") < layer_of("moue.config") < layer_of("moue.model.pool")
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from moue.training import checkpoint\n")
    assert (2, "moue.training.checkpoint") in imports(source)
