"""Every relative link in the README and docs/ reaches a file, and every #anchor a heading of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^()\s#]*)(?:#([^()\s]+))?\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a "# comment" in code is no heading
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(pages: list[Path], root: Path = ROOT) -> list[str]:
    broken = []
    for page in pages:
        for target, anchor in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target) if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(root)}: {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(root)}: no heading of {path.name} has #{anchor}")
    return broken


def test_every_docs_link_and_anchor_resolves():
    assert broken_links([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]) == []


def test_a_missing_heading_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Real one\n\n[ok](#real-one) [bad](#gone)\n")
    assert broken_links([tmp_path / "a.md"], tmp_path) == ["a.md: no heading of a.md has #gone"]
