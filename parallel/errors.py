"""``UserError``: the one exception type for bad input from a user (a config value, a file, a
layout, a launch environment). Every command catches it alone and prints its message, which
names the field or file, the value and the fix, then exits with status 2; any other exception
is a bug and keeps its traceback.

It lives in the lowest layer of the project (``parallel``, which ``moue`` and ``data_tools``
both import) so that every package raises the same type.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user. A ``ValueError``, so callers that catch those still work."""
