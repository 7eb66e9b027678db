"""New output directories: checked before any work, written aside, renamed when complete.

Every command that writes a new directory (``moue-export``, ``moue-convert import``, ``export``
and ``widen``) takes its path here first, so a path that cannot be written is refused before a
checkpoint is loaded, and a run that stops part-way leaves only the hidden staging directory
(``.NAME.partial``), which the next attempt removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from parallel.errors import UserError


def new_output(output: str, flag: str) -> tuple[Path, Path]:
    """The output path (it must not exist, and its nearest existing parent must be a directory
    this process may write in) and its hidden staging twin, emptied."""
    out = Path(output)
    if out.exists():
        raise UserError(f"{flag} {out}: exists; give a new directory (nothing is overwritten)")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is a file, not a directory; give a path in a "
                        "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: this user may not write in {parent}; give a path in a "
                        "directory you can write to")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return out, tmp
