"""The built-in corpus: the running Python's standard library sources, one document per file.

A real, varied corpus (code, docstrings, comments; tens of MB) that every machine has, with no
download: ``make demo``, the tests and the benchmarks use it. The held-out split is chosen by a
hash of each file's path relative to the library, so it is the same on every machine with the
same Python version; ``site-packages`` is left out.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from data_tools.preprocess import ensure_writable_dir
from parallel.errors import UserError


@dataclass(frozen=True)
class CorpusFiles:
    train: Path
    valid: Path
    train_documents: int
    valid_documents: int
    bytes: int


def stdlib_sources(limit_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files (sorted; the first ``limit_bytes`` worth if given)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if "site-packages" not in f.parts and "dist-packages" not in f.parts)
    if limit_bytes is None:
        return files
    kept, total = [], 0
    for f in files:
        if total >= limit_bytes:
            break
        kept.append(f)
        total += f.stat().st_size
    return kept


def build_stdlib_corpus(out_dir: str | Path, valid_percent: float = 2.0,
                        limit_bytes: int | None = None) -> CorpusFiles:
    """Write ``train.jsonl`` and ``valid.jsonl`` (``{"text", "path"}`` per file) atomically."""
    if not 0 <= valid_percent < 100:
        raise UserError(f"--valid-percent {valid_percent}: must be in [0, 100), e.g. 2")
    out = Path(out_dir)
    ensure_writable_dir(out, "--output")
    root = Path(sysconfig.get_paths()["stdlib"])
    names = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    temps = {k: v.with_suffix(f".tmp-{os.getpid()}") for k, v in names.items()}
    counts, total = {"train": 0, "valid": 0}, 0
    try:
        with open(temps["train"], "w") as train, open(temps["valid"], "w") as valid:
            for path in stdlib_sources(limit_bytes):
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue  # a few test fixtures are deliberately not UTF-8
                if not text.strip():
                    continue
                rel = str(path.relative_to(root))
                split = "valid" if zlib.crc32(rel.encode()) % 10000 < valid_percent * 100 else "train"
                (valid if split == "valid" else train).write(
                    json.dumps({"text": text, "path": rel}) + "\n")
                counts[split] += 1
                total += len(text.encode("utf-8"))
        for kind in names:
            os.replace(temps[kind], names[kind])
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return CorpusFiles(names["train"], names["valid"], counts["train"], counts["valid"], total)
