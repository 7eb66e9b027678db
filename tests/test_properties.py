"""docs/properties.md lists every test (tests/properties.py writes it)."""

from pathlib import Path

from tests.properties import properties

PAGE = Path(__file__).resolve().parents[1] / "docs" / "properties.md"


def test_the_property_list_is_the_suites():
    assert PAGE.read_text() == properties(), (
        "docs/properties.md is behind the tests: python -m tests.properties > docs/properties.md")
