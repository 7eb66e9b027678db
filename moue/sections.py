"""Config sections: frozen dataclasses whose fields are type-checked when built.

Every field is checked against its declared type, whether the value came from a file, an
override or Python: ``"false"`` is not a bool and a list is not a number. Numbers written as
strings (YAML 1.1 reads ``1e-3`` as one) are taken as the number they spell. The checks are done
here rather than by a validation library: the sections are small frozen dataclasses and the
messages must name the field and the fix, which a hand-written check does in a dozen lines
without a new dependency. ``moue.config`` and ``moue.elastic`` declare their sections on this base.
"""

from __future__ import annotations

from dataclasses import fields

from parallel.errors import UserError


def check(ok: bool, name: str, value, fix: str):
    if not ok:
        raise UserError(f"{name}={value!r}: {fix}")


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "list": "a list"}


def _typed(name: str, annotation: str, value):
    """``value`` as the declared type of field ``name``, or a ``UserError`` naming both."""
    kinds = annotation.replace(" ", "").split("|")
    if value is None and "None" in kinds:
        return None
    if isinstance(value, str) and ("int" in kinds or "float" in kinds):
        try:  # YAML 1.1 reads 1e-3 (and 1e3) as a string
            number = float(value)
            value = int(number) if "int" in kinds and number.is_integer() else (
                number if "float" in kinds else value)
        except (ValueError, OverflowError):
            pass
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "list": lambda v: isinstance(v, list)}
    if any(ok[k](value) for k in kinds if k in ok):
        return float(value) if kinds[0] == "float" else value
    wanted = " or ".join([_TYPE_NAMES[k] for k in kinds if k in _TYPE_NAMES]
                         + (["null"] if "None" in kinds else []))
    hint = " (write true or false, without quotes)" if "bool" in kinds else ""
    raise UserError(f"{name}={value!r}: must be {wanted}{hint}")


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
