"""Config sections: frozen dataclasses whose fields are type-checked when built.

Every field is checked against its declared type, whether the value came from a file, an
override or Python: ``"false"`` is not a bool and a list is not a number. Numbers written as
strings (YAML 1.1 reads ``1e-3`` as one) are taken as the number they spell. The checks are done
here rather than by a validation library: the sections are small frozen dataclasses and the
messages must name the field and the fix, which a hand-written check does in a dozen lines
without a new dependency. ``moue.config`` and ``moue.elastic`` declare their sections on this base.
"""

from __future__ import annotations

from dataclasses import field, fields

from parallel.errors import UserError


def check(ok: bool, name: str, value, fix: str):
    if not ok:
        raise UserError(f"{name}={value!r}: {fix}")


# Whether a run may change a field of the model and moe sections when it resumes from a
# checkpoint: ARCHITECTURE fields decide what the weights are and mean (a checkpoint loads only
# into a run with the same values), the others steer training or choose kernels.
ARCHITECTURE, MAY_CHANGE = "architecture", "may change"


def setting(default, doc: str, *, resume: str | None = None):
    """A config field: its default, what it means (docs/configuration.md's tables are generated
    from it) and, in the model and moe sections, ``resume``: ARCHITECTURE or MAY_CHANGE."""
    assert resume in (None, ARCHITECTURE, MAY_CHANGE), resume
    return field(default=default, metadata={"doc": doc, "resume": resume})


_SINGULAR = {"int": "an integer", "float": "a number", "bool": "true or false",
             "str": "a string", "None": "null"}
_PLURAL = {"int": "integers", "float": "numbers", "bool": "true/false values", "str": "strings"}


def _alternatives(annotation: str) -> list[str]:
    """``A | list[B | C] | None`` split at its top level."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "|" and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    return [*parts, annotation[start:].strip()]


def _describe(annotation: str, plural: bool = False) -> str:
    kinds = _alternatives(annotation)
    words = []
    for kind in kinds:
        if kind.startswith("list["):
            inner = _describe(kind[5:-1], plural=True)
            words.append(f"lists of {inner}" if plural else f"a list of {inner}")
        else:
            words.append(_PLURAL.get(kind, kind) if plural and kind != "None"
                         else _SINGULAR.get(kind, kind))
    return " or ".join(words)


_NO = object()


def _convert(kind: str, value):
    """``value`` as ``kind`` (one alternative of an annotation), or ``_NO``."""
    if kind == "None":
        return None if value is None else _NO
    if kind.startswith("list["):
        if not isinstance(value, list):
            return _NO
        items = [_as(kind[5:-1], item) for item in value]
        return _NO if any(item is _NO for item in items) else items
    if isinstance(value, str) and kind in ("int", "float"):
        try:  # YAML 1.1 reads 1e-3 (and 1e3) as a string
            number = float(value)
        except (ValueError, OverflowError):
            return _NO
        value = int(number) if kind == "int" and number.is_integer() else number
    if kind == "bool":
        return value if isinstance(value, bool) else _NO
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO
    if kind == "str":
        return value if isinstance(value, str) else _NO
    raise TypeError(f"config fields are declared with int, float, bool, str, list[...] and "
                    f"None; not {kind!r}")


def _as(annotation: str, value):
    for kind in _alternatives(annotation):
        converted = _convert(kind, value)
        if converted is not _NO:
            return converted
    return _NO


def _typed(name: str, annotation: str, value):
    """``value`` as the declared type of field ``name``, or a ``UserError`` naming both."""
    converted = _as(annotation, value)
    if converted is not _NO:
        return converted
    hint = " (write true or false, without quotes)" if "bool" in _alternatives(annotation) else ""
    raise UserError(f"{name}={value!r}: must be {_describe(annotation)}{hint}")


class Section:
    """A config section: type-checks every field, then runs the section's ``_validate``."""

    section: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = _typed(f"{self.section}.{f.name}", f.type, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self):
        pass


def positive(section: str, obj, *names: str):
    for n in names:
        v = getattr(obj, n)
        check(v >= 1, f"{section}.{n}", v, "must be a positive integer")


def one_of(name: str, value, choices):
    check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference(cls, with_resume: bool = False) -> str:
    """The Markdown table of a section's fields: key, type, default, meaning (and whether a
    resumed run may change it)."""
    head = "| key | type | default | meaning |" + (" on resume |" if with_resume else "")
    lines = [head, "|---" * (5 if with_resume else 4) + "|"]
    for f in fields(cls):
        kinds = " or ".join("null" if k == "None" else k for k in _alternatives(f.type))
        row = (f"| `{f.name}` | {kinds} | {_shown(f.default)} | "
               f"{f.metadata.get('doc', '')} |")
        if with_resume:
            row += f" {f.metadata.get('resume')} |"
        lines.append(row)
    return "\n".join(lines)
