"""Corpus readers: JSONL (also .gz) and plain-text files, or directories of them.

A reader yields ``Document``s (text and where it came from) or ``Bad`` records (where, and why):
the caller decides whether a bad record stops the run (with ``file:line`` and the reason) or is
counted and skipped (``--skip-bad``). Readers are registered by file suffix.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from parallel.errors import UserError


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file:line (JSONL) or file (plain text)


@dataclass(frozen=True)
class Bad:
    source: str
    reason: str


Record = Document | Bad
READERS: dict[str, Callable[..., Iterator[Record]]] = {}


def register_reader(*suffixes: str):
    def register(fn):
        for suffix in suffixes:
            READERS[suffix] = fn
        return fn
    return register


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


@register_reader(".jsonl", ".jsonl.gz", ".json.gz")
def read_jsonl(path: Path, json_key: str = "text") -> Iterator[Record]:
    """One document per line: ``{"text": ...}`` (``json_key`` names the field)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Bad(where, f"invalid UTF-8 at byte {err.start}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield Bad(where, f"malformed JSON: {err.msg} (column {err.colno})")
                continue
            if not isinstance(record, dict) or json_key not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                yield Bad(where, f"no key {json_key!r} (found: {keys}); choose it with --json-key")
                continue
            text = record[json_key]
            if not isinstance(text, str):
                yield Bad(where, f"{json_key!r} is {type(text).__name__}, not text")
            elif not text.strip():
                yield Bad(where, "empty document")
            else:
                yield Document(text, where)


@register_reader(".txt", ".md", ".py", ".rst")
def read_text(path: Path, json_key: str = "text") -> Iterator[Record]:
    """A whole file is one document."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        yield Bad(str(path), f"invalid UTF-8 at byte {err.start}")
        return
    if not text.strip():
        yield Bad(str(path), "empty document")
    else:
        yield Document(text, str(path))


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files named, and the readable files under directories named (sorted, recursive)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in READERS)
        elif p.is_file():
            if _suffix(p) not in READERS:
                raise UserError(f"{p}: unknown input kind {_suffix(p)!r}; readable: "
                                 f"{', '.join(sorted(READERS))}")
            files.append(p)
        else:
            raise UserError(f"--input {p}: no such file or directory")
    if not files:
        raise UserError(f"--input {' '.join(map(str, paths))}: no readable files "
                         f"({', '.join(sorted(READERS))})")
    return files


def read_records(paths: list[str | Path], json_key: str = "text") -> Iterator[Record]:
    for path in expand_inputs(paths):
        yield from READERS[_suffix(path)](path, json_key=json_key)
