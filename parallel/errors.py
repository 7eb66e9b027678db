"""``UserError``: the one exception type for bad input from a user (a config value, a file, a
layout, a launch environment). Every command catches it alone and prints its message, which
names the field or file, the value and the fix, then exits with status 2; any other exception
is a bug and keeps its traceback.

It lives in the lowest layer of the project (``parallel``, which ``moue`` and ``data_tools``
both import) so that every package raises the same type.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user. A ``ValueError``, so callers that catch those still work.

    ``every_rank``: every process of a job meets this input alike (a config value, a shared
    file), so one process (global rank 0) reports it. False for what one rank may meet alone
    (its own shard of a checkpoint): that rank reports it.
    """

    def __init__(self, message: str, *, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank
