"""The list of what the suite checks, one line per test, written from the tests themselves.

Each test's name states its property (``test_resume_continues_exactly``), so the list is the
names, by file, with the target that runs each (``make test`` unless marked). docs/properties.md
is this list; ``tests/test_properties.py`` fails when it falls behind the tests, so a test that is
dropped or moved to another target shows in the diff of that page.

    python -m tests.properties > docs/properties.md
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKS = {"gpu": "make test-gpu", "slow": "make test-slow", "images": "make test-images"}
HEADER = """# What the suite checks

One line per test, by file: each test's name is the property it checks. A test runs in
`make test` unless its line names another target. Written by `python -m tests.properties >
docs/properties.md` (`make test` fails when this page falls behind the tests);
[testing.md](testing.md) says how the tests run and what they cost.
"""


def _marks(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in MARKS}


def properties() -> str:
    lines = [HEADER.rstrip("\n")]
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = set().union(*(_marks(n.value) for n in tree.body if isinstance(n, ast.Assign)
                                     and any(getattr(t, "id", "") == "pytestmark"
                                             for t in n.targets)))
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                 and n.name.startswith("test_")]
        if not tests:
            continue
        lines.append(f"\n## {path.name}\n")
        for test in tests:
            marks = module_marks.union(*(_marks(d) for d in test.decorator_list))
            target = next((MARKS[m] for m in MARKS if m in marks), None)
            sentence = test.name.removeprefix("test_").replace("_", " ")
            lines.append(f"- {sentence}" + (f" ({target})" if target else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(properties(), end="")
